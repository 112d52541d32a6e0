#!/usr/bin/env python3
"""Tests for attune.py, and the fake Attune server they run against.

    python3 test_attune.py run-suite [NAME...]  the whole suite, a line per class (make test)
    python3 test_attune.py check             the quick part, about two and a half minutes (make check)
    python3 test_attune.py test-all [--coverage MIN]
                                             the suite on every Python found (make test-all, make ci)
    python3 test_attune.py coverage MIN      the suite measured, its processes too (make coverage)
    python3 test_attune.py serve [--port N] [--access-ttl S] [--refresh-mode M]
                                             the embedded sandbox (user admin, password admin)
    python3 test_attune.py demo              scripted walk-through against the sandbox (make demo)
    python3 test_attune.py interpreters      the interpreters test-all uses
    python3 test_attune.py bench [--runs N]  the start-up and refresh figures (make bench)

Stdlib unittest only. Most tests call attune.main(argv) in process against a
FakeAttune on 127.0.0.1:0; real processes only where the subject is a process (exit
codes, signals, concurrency, encodings, the copied and installed forms), started from
the bytecode cache (attune_argv()). No test uses the real home directory or any
network beyond loopback. Every run is scanned for leaked tokens and passwords.

Where a new command goes: its handler is a method of the fake server's class for its
group (one class and section per command group, named as in attune.py: `pack ...` is
FakePacks under "Fake server: packs"), with @route(method, path pattern) right above it
and its seed data in that class's seed_ method; read the server's route first, so that
the fake answers as it does (envelope, both error shapes, pagination, status codes). Its
tests go in a <Group>CommandTests(ResourceTestCase) class under "Tests: resource
commands", in process through self.ok()/self.fails(); a real process only where the
subject is one (exit codes, signals, concurrency). A hostile-input case goes in the
tables of "Tests: untrusted input", a bound in "Tests: bounds".
"""

import base64
import contextlib
import errno
import hashlib
import hmac
import http.server
import io
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ATTUNE_PY = os.path.join(HERE, "attune.py")
sys.path.insert(0, HERE)
import attune  # noqa: E402


def compile_attune():
    """Write attune.py's bytecode cache for this interpreter unless it is fresh: the child
    Pythons the tests start (`-m attune`, `import attune`) then load it instead of compiling
    the whole file again. Written even under PYTHONDONTWRITEBYTECODE, which only stops imports."""
    import importlib.util
    import py_compile
    cache = importlib.util.cache_from_source(ATTUNE_PY)
    try:
        if not os.path.exists(cache) or os.stat(cache).st_mtime < os.stat(ATTUNE_PY).st_mtime:
            py_compile.compile(ATTUNE_PY, doraise=True)
    except (OSError, py_compile.PyCompileError):  # a read-only checkout: each child compiles
        pass


compile_attune()


def attune_argv(script=False):
    """How a test starts attune.py as a process. Normally `python -m attune`, which loads
    the bytecode compiled above (a copied script compiles the whole file again in every
    process: about 0.1 s of CPU each, hundreds of times a run). With script=True, the
    copied file itself, for the tests whose subject is that form."""
    return [sys.executable, ATTUNE_PY] if script else [sys.executable, "-m", "attune"]


def child_env(environ):
    """environ for a child Python: attune importable (-m attune, `import attune`), and under
    `make coverage` the variables that let coverage measure the child too."""
    environ = dict(environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        path for path in (HERE, environ.get("PYTHONPATH"), os.environ.get("PYTHONPATH")) if path)
    environ.update((name, value) for name, value in os.environ.items() if name.startswith("COVERAGE_PROCESS"))
    return environ

POSIX = os.name == "posix"
PASSWORD = "s3cret-Admin-pw"  # the fake server's admin password in tests (the sandbox uses admin)
IS_ROOT = POSIX and os.geteuid() == 0

# A job started in the background (`make test &`, nohup, some CI runners) has SIGINT or
# SIGHUP ignored, and its children would inherit that; the tests that send signals need
# attune.py to start as it does in a terminal. A Python-level handler here is reset to the
# default in every child (exec does that), while this process stays as it was asked to be.
for name in ("SIGINT", "SIGHUP", "SIGTERM", "SIGQUIT") if POSIX else ():
    if signal.getsignal(getattr(signal, name)) == signal.SIG_IGN:
        signal.signal(getattr(signal, name),
                      signal.default_int_handler if name == "SIGINT" else lambda signum, frame: None)

# === Fake Attune server ======================================================
# Faithful to the real server (its routes: crates/api/src/routes in attune-system/attune)
# where the client can tell: root /auth and /health routes, /api/v1 resources, {"data": ...}
# envelopes, paginated {"items", "pagination"} lists, both error shapes, HS256 JWTs with sub,
# login, iat, exp and token_type, expires_in, and 60 s of leeway on exp. One class per
# command group, in sections named as attune.py's; each handler declares its routes above it.

JWT_SECRET = b"attune.py fake server secret"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims, secret=JWT_SECRET):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, (header + "." + payload).encode(), hashlib.sha256).digest()
    return header + "." + payload + "." + b64url(signature)


def verify_jwt(token, now, leeway=60, secret=JWT_SECRET):
    """(claims, None) for a valid token, (None, reason) otherwise."""
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(secret, (header + "." + payload).encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(b64url(expected), signature):
            return None, "bad signature"
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None, "malformed"
    if claims.get("exp", 0) + leeway < now:
        return None, "expired"
    return claims, None


class Seen:
    """One request as the fake server received it."""

    def __init__(self, method, target, headers, body):
        parts = urlsplit(target)
        self.method, self.target, self.path = method, target, parts.path
        self.query = parse_qs(parts.query)
        self.headers, self.body = headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8")) if self.body else None

    @property
    def token(self):
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def __repr__(self):
        return "<%s %s>" % (self.method, self.target)


def envelope(data, message=None):
    body = {"data": data}
    if message:
        body["message"] = message
    return body


def api_error(status, message, code):
    return status, {"error": message, "code": code}


SECRET_ATTRIBUTE_WORDS = ("password", "secret", "token", "api_key", "authorization", "private_key", "encryption_key")


def identity_answer(identity):
    """An identity as the server answers it: attributes whose key names a secret as ***
    (routes/permissions.rs, sanitize_identity_attributes)."""
    attributes = identity.get("attributes")
    if isinstance(attributes, dict):
        attributes = {k: "***" if any(w in k.lower() for w in SECRET_ATTRIBUTE_WORDS) else v
                      for k, v in attributes.items()}
    return dict(identity, attributes=attributes)


def identity_problem(body, creating):
    """The validator's message for a create or update identity body, or None."""
    login, password = body.get("login"), body.get("password")
    if creating and (not isinstance(login, str) or not 3 <= len(login) <= 255):
        return "Validation failed: login: length"
    if password is not None and (not isinstance(password, str) or not 8 <= len(password) <= 128):
        return "Validation failed: password: length"
    if body.get("attributes") is not None and not isinstance(body["attributes"], dict):
        return "Failed to deserialize the JSON body into the target type: attributes"
    return None


# === Fake server: what every group shares ====================================

SEED_STAMP = "2026-11-01T12:00:00.000000Z"
TERMINAL = ("completed", "failed", "cancelled", "timeout", "abandoned")
EXECUTION_SUMMARY_FIELDS = ("id", "action_ref", "status", "parent", "enforcement", "rule_ref", "trigger_ref",
                            "trace_tag", "timeout_seconds", "started_at", "workflow_task", "original_execution",
                            "created", "updated")
RULE_FIELDS = ("ref", "pack_ref", "label", "description", "trigger_ref", "action_ref", "conditions",
               "action_params", "trigger_params", "enabled", "trace_tag_template")
REF = r"(?P<ref>[^/]+)"


class Download:
    """A file answer: raw bytes with their media type and Content-Disposition."""

    def __init__(self, content, content_type, disposition):
        self.content, self.content_type, self.disposition = content, content_type, disposition


class EventStream:
    """A text/event-stream answer: the handler writes each chunk as the generator yields it."""

    def __init__(self, chunks):
        self.chunks = chunks


def sse_event(event, data, event_id=None):
    lines = ["event: %s" % event] + (["id: %s" % event_id] if event_id is not None else [])
    lines += ["data: %s" % line for line in data.split("\n")]
    return "\n".join(lines) + "\n\n"


def parse_multipart(body, content_type):
    """({field: text}, {field: (filename, content type, bytes)}) of a multipart/form-data body."""
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    fields, files = {}, {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        head = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', head).group(1)
        filename = re.search(r'filename="([^"]*)"', head)
        ctype = re.search(r"Content-Type:\s*(\S+)", head, re.I)
        if filename:
            files[name] = (filename.group(1), ctype.group(1) if ctype else None, data[:-2])
        else:
            fields[name] = data[:-2].decode("utf-8")
    return fields, files


ROUTES = []  # (method, path pattern, handler name, anonymous, query names, body keys), as @route declares them


def route(method, pattern, anonymous=False, query="", body=None):
    """Declare the handler below as the answer to method on paths matching pattern (the whole
    path; named groups become arguments). Stack one per route. anonymous: no token needed (the
    server's public routes under /api/v1). query: the names of the query parameters the
    server's route takes (its Query DTOs); body: the top-level keys of the JSON object its
    request DTO takes ("" none: {} at most; "*" anything: a document the user wrote, or a
    file upload). A request with any other breaks the contract (the server would ignore it
    without a word), and the test that sent it fails."""
    def declare(handler):
        keys = None if body is None else frozenset(body.split())
        ROUTES.append((method, pattern, handler.__name__, anonymous, frozenset(query.split()), keys))
        return handler
    return declare


class FakeResources:
    """A small in-memory Attune: the shapes every group's handlers share. Lists are
    paginated as the real server does."""

    def stamp(self):
        now = self.now()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % (int(now * 1e6) % 1000000)

    def new_id(self):
        with self.lock:
            self.last_id += 1
            return self.last_id

    def paginate(self, req, items, size_param="page_size", totals=True):
        def number(name, default):
            try:
                return int(req.query.get(name, [default])[0])
            except ValueError:
                return None
        page, size = number("page", 1), number(size_param, 50)
        if page is None or size is None:
            return 400, "Failed to deserialize query string: invalid digit found in string"
        page, size = max(1, page), min(100, max(1, size))
        total = len(items)
        pages = max(1, (total + size - 1) // size)
        pagination = {"page": page, "page_size": size, "total_items": total, "total_pages": pages,
                      "has_previous": page > 1, "has_next": page < pages}
        if not totals:
            del pagination["total_items"], pagination["total_pages"]
        return 200, {"items": items[(page - 1) * size:page * size], "pagination": pagination}

    def listed(self, req, collection, pack=None, fields=None):
        items = sorted(collection.values(), key=lambda item: item["id"])
        if pack is not None:
            if pack not in self.packs:
                return api_error(404, "Pack '%s' not found" % pack, "NOT_FOUND")
            items = [item for item in items if item.get("pack_ref") == pack]
        if fields:
            items = [{k: item.get(k) for k in fields} for item in items]
        return self.paginate(req, items)

    def lookup(self, collection, ref, label):
        item = collection.get(ref)
        if item is None:
            return None, api_error(404, "%s '%s' not found" % (label, ref), "NOT_FOUND")
        return item, None

    def removed(self, collection, ref, label):
        with self.lock:
            if collection.pop(ref, None) is None:
                return api_error(404, "%s '%s' not found" % (label, ref), "NOT_FOUND")
        return 200, {"success": True, "message": "%s '%s' deleted successfully" % (label, ref)}

    def toggled(self, collection, ref, label, enabled):
        item, error = self.lookup(collection, ref, label)
        if error:
            return error
        item.update(enabled=enabled, updated=self.stamp())
        return 200, envelope(item, "%s %s successfully" % (label, "enabled" if enabled else "disabled"))


# === Fake server: auth =======================================================

class FakeAuth(FakeResources):
    """Logins (password, LDAP, integration token, the OIDC device flow), refresh,
    /auth/me, and integration tokens (routes/permissions.rs: the token itself only in the
    create answer)."""

    @route("GET", r"/auth/settings")
    def auth_settings(self, req):
        return 200, envelope(dict(self.settings))

    def password_login(self, req, users):
        body = req.json() or {}
        login, password = body.get("login"), body.get("password")
        if isinstance(password, str):
            self.received.add(password)
        if not isinstance(login, str) or not login or not isinstance(password, str) or not password:
            return api_error(422, "Validation failed: login and password are required", "VALIDATION_ERROR")
        user = users.get(login)
        # the server compares the password's UTF-8 bytes (with its hash); a lone surrogate never matches
        if not user or not hmac.compare_digest(user["password"].encode("utf-8"),
                                               password.encode("utf-8", "surrogatepass")):
            return api_error(401, "Invalid login or password", "UNAUTHORIZED")
        return self.token_body(login)

    @route("POST", r"/auth/login", body="login password")
    def auth_login(self, req):
        return self.password_login(req, self.users)

    @route("POST", r"/auth/ldap/login", body="login password")
    def auth_ldap_login(self, req):
        if not self.settings.get("ldap_enabled"):
            return api_error(501, "LDAP authentication is not configured", "NOT_IMPLEMENTED")
        return self.password_login(req, self.ldap_users)

    @route("POST", r"/auth/token-login", body="token")
    def auth_token_login(self, req):
        token = (req.json() or {}).get("token")
        if isinstance(token, str):
            self.received.add(token)
        login = self.integration_tokens.get(token)
        record = self.itoken_records.get(token)
        if not login or (record and not record["active"]):
            return api_error(401, "Invalid token", "UNAUTHORIZED")
        return self.token_body(login)

    @route("POST", r"/auth/refresh", body="refresh_token")
    def auth_refresh(self, req):
        body = req.json() if req.body else None
        if not isinstance(body, dict) or "refresh_token" not in body:
            return api_error(401, "Missing refresh token", "UNAUTHORIZED")
        token = body["refresh_token"]
        if isinstance(token, str):
            self.received.add(token)
        if not token:
            return api_error(422, "Invalid refresh token request: refresh_token is empty",
                             "VALIDATION_ERROR")
        claims, problem = verify_jwt(token, self.now())
        if problem:
            return api_error(401, "Invalid or expired refresh token", "UNAUTHORIZED")
        if claims.get("token_type") != "refresh":
            return api_error(401, "Invalid token type", "UNAUTHORIZED")
        with self.lock:
            if self.refresh_mode == "single-use":
                if token in self.used_refresh:
                    return api_error(401, "Invalid or expired refresh token", "UNAUTHORIZED")
                self.used_refresh.add(token)
        return self.token_body(claims["login"], with_user=False)

    def seal(self, session):
        """A new opaque device_code for session; the one it replaces no longer works."""
        self.nonce += 1
        code = "sealed.%d.%s" % (self.nonce, b64url(os.urandom(24)))
        self.device_sessions[code] = session
        self.device_codes.add(code)
        return code

    @route("POST", r"/auth/oidc/device/start", body="")
    def device_start(self, req):
        if not self.device["enabled"]:
            return api_error(501, "OIDC device login requires security.encryption_key on the API server",
                             "NOT_IMPLEMENTED")
        with self.lock:
            now, d = time.time(), self.device
            session = {"polls": 0, "interval": d["interval"], "next_poll_at": now + d["interval"],
                       "expires_at": now + d["expires_in"]}
            data = {"device_code": self.seal(session), "user_code": "WDJB-MJHT",
                    "verification_uri": self.url + "/device",
                    "verification_uri_complete": self.url + "/device?user_code=WDJB-MJHT",
                    "expires_in": d["expires_in"], "interval": d["interval"]}
            data.update(d["start"])  # a test's bad values
        return 200, envelope(data)

    @route("POST", r"/auth/oidc/device/poll", body="device_code")
    def device_poll(self, req):
        body = req.json()
        if not isinstance(body, dict) or set(body) != {"device_code"} or not isinstance(body["device_code"], str):
            return api_error(422, "Validation failed: device_code is required", "VALIDATION_ERROR")
        with self.lock:
            session = self.device_sessions.pop(body["device_code"], None)  # a re-sealed code is spent
            if session is None:
                return api_error(400, "Invalid device authorization session", "BAD_REQUEST")
            now, d = time.time(), self.device
            if now > session["expires_at"]:
                return 200, envelope({"status": "expired"})
            reason = None
            if d["enforce_interval"] and now < session["next_poll_at"] - 0.2:
                reason = "slow_down"
            elif session["polls"] < d["waits"]:
                session["polls"] += 1
                reason = d["reasons"].pop(0) if d["reasons"] else "authorization_pending"
            if reason:
                session["interval"] = {"slow_down": session["interval"] + 5,
                                       "provider_timeout": session["interval"] * 2}.get(reason, session["interval"])
                session["next_poll_at"] = now + session["interval"]
                return 200, envelope({"status": "waiting", "reason": reason, "device_code": self.seal(session),
                                      "interval": session["interval"]})
            if d["outcome"] != "authorized":
                return 200, envelope({"status": d["outcome"]})
        tokens = self.token_body(d["login"])[1]["data"]
        return 200, envelope({"status": "authorized", "tokens": tokens})

    @route("GET", r"/auth/me")
    def auth_me(self, req):
        claims, problem = self.bearer_claims(req)
        if problem:  # /auth/me answers with the flat shape
            return api_error(401, "Unauthorized", "UNAUTHORIZED")
        login = claims["login"]
        user = self.users.get(login) or self.ldap_users.get(login) or {"id": 0, "display_name": None}
        return 200, envelope({
            "id": user["id"], "login": login, "display_name": user["display_name"],
            "auth_provider": "ldap" if login in self.ldap_users else "local",
            "is_local": login not in self.ldap_users, "can_change_password": True,
            "effective_permissions": [{"resource": "packs", "actions": ["read", "create"]}],
            "assigned_permission_set_refs": ["core.admin"]})

    @route("POST", r"/auth/change-password", body="current_password new_password")
    def auth_change_password(self, req):
        """routes/auth.rs: a user access token; the new password 8..128 characters (422); a
        wrong current one is 401 in the flat shape; provider-managed or frozen identities 403."""
        claims, problem = self.bearer_claims(req)
        if problem:
            return api_error(401, "Unauthorized", "UNAUTHORIZED")
        body = req.json() if req.body else None
        current, new = (body.get("current_password"), body.get("new_password")) if isinstance(body, dict) else (0, 0)
        for value in (current, new):
            if isinstance(value, str):
                self.received.add(value)
        if not isinstance(current, str) or not isinstance(new, str):
            return api_error(422, "Failed to deserialize the JSON body into the target type", "VALIDATION_ERROR")
        if not current or not 8 <= len(new) <= 128:
            return api_error(422, "Invalid change password request: new_password: length", "VALIDATION_ERROR")
        login = claims["login"]
        if login in self.ldap_users:
            return api_error(403, "Passwords for this identity are managed by the configured identity provider",
                             "FORBIDDEN")
        if any(i["login"] == login and i["frozen"] for i in self.identities.values()):
            return api_error(403, "Identity is frozen and cannot change its password", "FORBIDDEN")
        user = self.users.get(login)
        if not user or not user.get("password"):
            return api_error(401, "No password set", "UNAUTHORIZED")
        if not hmac.compare_digest(user["password"].encode("utf-8"), current.encode("utf-8", "surrogatepass")):
            return api_error(401, "Invalid current password", "UNAUTHORIZED")
        with self.lock:
            user["password"] = new
            self.password_changes.append(login)
        return 200, envelope({"success": True, "message": "Password changed successfully"})

    def itoken(self, iid, tid):
        for record in self.itoken_records.values():
            if record["id"] == int(tid) and record["identity_id"] == int(iid):
                return record, None
        return None, api_error(404, "Integration token '%s' not found" % tid, "NOT_FOUND")

    @route("GET", r"/api/v1/identities/(?P<iid>\d+)/integration-tokens")
    def itokens_list(self, req, iid):
        return 200, envelope([r for r in sorted(self.itoken_records.values(), key=lambda r: r["id"])
                              if r["identity_id"] == int(iid)])

    @route("POST", r"/api/v1/identities/(?P<iid>\d+)/integration-tokens", body="label description expires_at")
    def itokens_create(self, req, iid):
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("label"), str) or \
                set(body) - {"label", "description", "expires_at"}:
            return api_error(422, "Validation failed: label is required", "VALIDATION_ERROR")
        if body.get("expires_at") and body["expires_at"] < self.stamp():
            return api_error(400, "Integration token expiration must be in the future", "BAD_REQUEST")
        identity = self.identities.get(int(iid))
        login = identity["login"] if identity else next((n for n, u in self.users.items() if u["id"] == int(iid)), None)
        if login is None:
            return api_error(404, "Identity %s not found" % iid, "NOT_FOUND")
        with self.lock:
            token = "attune_it_" + b64url(os.urandom(24))
            record = {"id": self.new_id(), "identity_id": int(iid), "label": body["label"],
                      "description": body.get("description"), "token_prefix": token[:14],
                      "token_suffix": token[-4:], "expires_at": body.get("expires_at"), "last_used_at": None,
                      "revoked_at": None, "active": True, "created": self.stamp()}
            self.integration_tokens[token] = login
            self.itoken_records[token] = record
        return 201, envelope({"token": token, "integration_token": record})

    @route("POST", r"/api/v1/identities/(?P<iid>\d+)/integration-tokens/(?P<tid>\d+)/revoke", body="reason")
    def itokens_revoke(self, req, iid, tid):
        record, error = self.itoken(iid, tid)
        if error:
            return error
        record.update(active=False, revoked_at=self.stamp())
        return 200, envelope(record)

    @route("DELETE", r"/api/v1/identities/(?P<iid>\d+)/integration-tokens/(?P<tid>\d+)")
    def itokens_delete(self, req, iid, tid):
        record, error = self.itoken(iid, tid)
        if error:
            return error
        with self.lock:
            token = next(t for t, r in self.itoken_records.items() if r is record)
            del self.itoken_records[token]
            self.integration_tokens.pop(token, None)
        return 200, envelope({"success": True, "message": "Integration token deleted successfully"})


# === Fake server: packs ======================================================

class FakePacks(FakeResources):
    """Packs, their installs (the tests run after the answer) and uploads."""

    def seed_packs(self):
        self.packs, self.uploads, self.installs = {}, [], {}
        for i, (ref, label, description) in enumerate([
                ("core", "Core", "Core actions, triggers and sensors"),
                ("linux", "Linux", "Actions for Linux hosts"),
                ("examples", "Examples", "Example workflows and rules")], start=1):
            self.packs[ref] = self.new_pack(i, ref, label, description)

    def new_pack(self, pack_id, ref, label, description=None, version="1.0.0", tags=()):
        return {"id": pack_id, "ref": ref, "label": label, "description": description,
                "version": version, "tags": list(tags), "is_standard": ref == "core",
                "created": SEED_STAMP, "updated": SEED_STAMP}

    @route("GET", r"/api/v1/packs", query="page page_size q")
    def packs_list(self, req):
        return self.listed(req, self.packs)

    @route("GET", r"/api/v1/packs/" + REF)
    def packs_show(self, req, ref):
        pack, error = self.lookup(self.packs, ref, "Pack")
        if error:
            return error
        count = lambda items: sum(1 for i in items.values() if i.get("pack_ref") == ref)  # noqa: E731
        return 200, envelope(dict(pack, conf_schema={}, config={}, meta={"author": "Attune team"},
                                  dependencies=["core"] if ref != "core" else [], runtime_deps=[],
                                  action_count=count(self.actions), trigger_count=count(self.triggers),
                                  rule_count=count(self.rules), sensor_count=count(self.sensors)))

    @route("POST", r"/api/v1/packs",
           body="ref label description version conf_schema config meta tags runtime_deps dependencies "
                "is_standard")
    def packs_create(self, req):
        body = req.json() or {}
        missing = [k for k in ("ref", "label", "version") if not body.get(k)]
        if missing:
            return api_error(422, "Validation failed: %s required" % ", ".join(missing), "VALIDATION_ERROR")
        with self.lock:
            if body["ref"] in self.packs:
                return api_error(409, "Pack with ref '%s' already exists" % body["ref"], "CONFLICT")
            pack = self.new_pack(self.new_id(), body["ref"], body["label"], body.get("description"),
                                 body["version"], body.get("tags") or ())
            self.packs[pack["ref"]] = pack
        return 201, envelope(pack)

    @route("PUT", r"/api/v1/packs/" + REF,
           body="label description version conf_schema config meta tags runtime_deps dependencies "
                "is_standard")
    def packs_update(self, req, ref):
        pack, error = self.lookup(self.packs, ref, "Pack")
        if error:
            return error
        body = req.json() or {}
        description = body.get("description")
        if description is not None:
            if not isinstance(description, dict) or description.get("op") not in ("set", "clear"):
                return api_error(422, "description must be a patch {op, value}", "VALIDATION_ERROR")
            pack["description"] = description.get("value") if description["op"] == "set" else None
        for field in ("label", "version", "tags"):
            if field in body:
                pack[field] = body[field]
        pack["updated"] = self.stamp()
        return 200, envelope(pack, "Pack updated successfully")

    @route("DELETE", r"/api/v1/packs/" + REF)
    def packs_delete(self, req, ref):
        return self.removed(self.packs, ref, "Pack")

    def installed(self, ref, status, skipped):
        with self.lock:
            pack = self.packs.get(ref) or self.new_pack(self.new_id(), ref, ref.title())
            self.packs[ref] = pack
        if self.install_tests and not skipped:  # newer servers: the tests run after the answer
            install_id = self.new_id()
            self.installs[install_id] = {"install_id": install_id, "pack_ref": ref, "pack_version": pack["version"],
                                         "status": "running", "trigger_reason": "install", "test_result": None,
                                         "error_message": None, "started_at": self.stamp(), "finished_at": None,
                                         "looks": 0}
            return status, envelope({"pack": pack, "test_result": None, "tests_skipped": False,
                                     "install_id": install_id, "install_status": "running"})
        tests = None if skipped else {"status": "passed", "summary": {"passed": 3, "total": 3}}
        return status, envelope({"pack": pack, "test_result": tests, "tests_skipped": skipped})

    @route("GET", r"/api/v1/packs/install/(?P<install_id>\d+)")
    def packs_install_status(self, req, install_id):
        install = self.installs.get(int(install_id))
        if install is None:
            return api_error(404, "Pack install %s not found" % install_id, "NOT_FOUND")
        install["looks"] += 1
        if install["looks"] >= 2 and install["status"] == "running":  # done at the second look
            outcome = self.install_tests
            passed = 3 if outcome == "succeeded" else 1
            install.update(status=outcome, finished_at=self.stamp(),
                           test_result={"passed": passed, "failed": 3 - passed, "total_tests": 3},
                           error_message=None if outcome == "succeeded" else "2 tests failed")
        return 200, envelope({k: v for k, v in install.items() if k != "looks"})

    @route("POST", r"/api/v1/packs/install",
           body="source ref_spec force skip_tests skip_deps no_registry registry_id "
                "absent_metadata_policy")
    def packs_install(self, req):
        body = req.json() or {}
        if not body.get("source"):
            return api_error(422, "Validation failed: source is required", "VALIDATION_ERROR")
        ref = re.sub(r"(\.git|\.tar\.gz)$", "", body["source"].rstrip("/").split("/")[-1]) or "pack"
        if ref in self.packs and not body.get("force"):
            return api_error(409, "Pack '%s' is already installed" % ref, "CONFLICT")
        return self.installed(ref, 201, bool(body.get("skip_tests")))

    @route("POST", r"/api/v1/packs/register", body="path skip_tests force absent_metadata_policy")
    def packs_register(self, req):
        body = req.json() or {}
        if not body.get("path"):
            return api_error(422, "Validation failed: path is required", "VALIDATION_ERROR")
        return self.installed(os.path.basename(body["path"].rstrip("/")), 201, bool(body.get("skip_tests")))

    @route("POST", r"/api/v1/packs/upload", body="*")
    def packs_upload(self, req):
        fields, files = parse_multipart(req.body, req.headers.get("Content-Type", ""))
        if "pack" not in files:
            return api_error(400, "Missing 'pack' file field", "BAD_REQUEST")
        import tarfile
        try:
            with tarfile.open(fileobj=io.BytesIO(files["pack"][2]), mode="r:gz") as tar:
                names = tar.getnames()
                manifest = tar.extractfile("pack.yaml").read().decode()
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            return api_error(400, "Invalid pack archive: %s" % e, "BAD_REQUEST")
        self.uploads.append({"fields": fields, "filename": files["pack"][0], "content_type": files["pack"][1],
                             "names": names})
        ref = re.search(r"^ref:\s*(\S+)", manifest, re.M).group(1)
        return self.installed(ref, 200, fields.get("skip_tests") == "true")


# === Fake server: actions ====================================================

class FakeActions(FakeResources):
    """Actions, listed, searched, per pack."""

    def seed_actions(self):
        self.actions = {}
        echo_schema = {"message": {"type": "string", "required": True, "description": "Text to print"},
                       "count": {"type": "integer", "default": 1}}
        for ref, runtime, description, schema, workflow in (
                ("core.echo", "core.python", "Print a message", echo_schema, None),
                ("core.sleep", "core.shell", "Sleep for a while", {"seconds": {"type": "integer"}}, None),
                ("core.fail", "core.shell", "Always fails", {}, None),
                ("core.noisy", "core.shell", "Prints ten lines", {}, None),
                ("linux.uptime", "core.shell", "Show the uptime", None, None),
                ("examples.deploy", None, "Build, test and notify",
                 {"env": {"type": "string", "enum": ["staging", "production", 3]}}, 7)):
            pack = ref.split(".")[0]
            self.actions[ref] = {
                "id": len(self.actions) + 1, "ref": ref, "pack": self.packs[pack]["id"], "pack_ref": pack,
                "label": ref.split(".")[1].title(), "description": description,
                "entrypoint": ref.split(".")[1] + ".py", "runtime": 1 if runtime else None,
                "runtime_ref": runtime, "runtime_version_constraint": ">=3.9" if runtime == "core.python" else None,
                "enabled": True, "accesses_mcp": False, "reference_visibility": "public",
                "workflow_def": workflow, "timeout_seconds": None, "param_schema": schema, "out_schema": None,
                "is_adhoc": False, "created": SEED_STAMP, "updated": SEED_STAMP}

    @route("GET", r"/api/v1/actions", query="page page_size q executable_with_current_access referencing_pack_ref")
    def actions_list(self, req):
        return self.listed(req, self.actions)

    @route("GET", r"/api/v1/packs/(?P<pack>[^/]+)/actions", query="page page_size")
    def pack_actions(self, req, pack):
        return self.listed(req, self.actions, pack)

    @route("GET", r"/api/v1/actions/search", query="q packs referencing_pack_ref page page_size")
    def actions_search(self, req):
        words = (req.query.get("q", [""])[0]).lower().split()
        packs = [p for p in req.query.get("packs", [""])[0].split(",") if p]
        hits = []
        for action in sorted(self.actions.values(), key=lambda a: a["id"]):
            text = " ".join(str(action.get(k) or "") for k in ("ref", "label", "description", "pack_ref")).lower()
            if all(w in text for w in words) and (not packs or action["pack_ref"] in packs):
                hits.append({"ref": action["ref"], "pack_ref": action["pack_ref"], "label": action["label"],
                             "description": action["description"], "runtime_ref": action["runtime_ref"],
                             "is_workflow": action["workflow_def"] is not None, "accesses_mcp": False})
        return self.paginate(req, hits)

    @route("GET", r"/api/v1/actions/" + REF)
    def actions_show(self, req, ref):
        action, error = self.lookup(self.actions, ref, "Action")
        return error or (200, envelope(action))

    @route("PUT", r"/api/v1/actions/" + REF,
           body="label description entrypoint runtime enabled runtime_ref runtime_version_constraint "
                "required_worker_runtimes worker_selector worker_tolerations worker_affinity param_schema "
                "out_schema accesses_mcp default_execution_permission_set_refs reference_visibility "
                "reference_allowed_pack_refs artifact_retention_policy artifact_retention_limit "
                "log_retention_policy log_retention_limit timeout_seconds")
    def actions_update(self, req, ref):
        action, error = self.lookup(self.actions, ref, "Action")
        if error:
            return error
        body = req.json() or {}
        for field in ("label", "description", "entrypoint", "enabled", "runtime"):
            if field in body:
                action[field] = body[field]
        patch = body.get("timeout_seconds")
        if isinstance(patch, dict):  # a patch: {"op": "set", "value": N} or {"op": "clear"}
            action["timeout_seconds"] = patch.get("value") if patch.get("op") == "set" else None
        action["updated"] = self.stamp()
        return 200, envelope(action)

    @route("DELETE", r"/api/v1/actions/" + REF)
    def actions_delete(self, req, ref):
        return self.removed(self.actions, ref, "Action")


# === Fake server: executions =================================================

class FakeExecutions(FakeResources):
    """Executions: statuses advance one step per GET; logs grow while a client
    tails them; the executions stream; traces."""

    def seed_executions(self):
        self.executions, self.plans, self.log_drops = {}, {}, {}

    @route("POST", r"/api/v1/executions/execute",
           body="action_ref parameters env_vars permission_set_refs timeout_seconds worker_selector "
                "worker_tolerations worker_affinity artifact_retention_policy artifact_retention_limit")
    def executions_execute(self, req):
        body = req.json()
        if not isinstance(body, dict) or not body.get("action_ref"):
            return api_error(422, "Validation failed: action_ref is required", "VALIDATION_ERROR")
        action = self.actions.get(body["action_ref"])
        if action is None:
            return api_error(404, "Action '%s' not found" % body["action_ref"], "NOT_FOUND")
        if not action["enabled"]:
            return api_error(400, "Action '%s' is disabled" % action["ref"], "BAD_REQUEST")
        parameters = body.get("parameters", {})
        timeout = body.get("timeout_seconds")
        if not isinstance(parameters, dict) or (timeout is not None and not (isinstance(timeout, int) and timeout > 0)):
            return api_error(422, "Validation failed: parameters must be an object, timeout_seconds > 0",
                             "VALIDATION_ERROR")
        extra = {k: body[k] for k in ("env_vars", "permission_set_refs", "artifact_retention_policy",
                                      "artifact_retention_limit") if k in body}
        execution = self.new_execution(action, parameters, timeout, **extra)
        return 201, envelope(execution)

    def new_execution(self, action, parameters, timeout=None, **fields):
        eid = self.new_id()
        stamp = self.stamp()
        execution = {"id": eid, "action": action["id"], "action_ref": action["ref"], "config": parameters,
                     "parent": None, "enforcement": None, "executor": None, "worker": None,
                     "status": "requested", "result": None, "trace_tag": None, "timeout_seconds": timeout,
                     "started_at": None, "workflow_task": None, "original_execution": None,
                     "rule_ref": None, "trigger_ref": None, "created": stamp, "updated": stamp}
        execution.update(fields)
        statuses, result, stdout, stderr = ["scheduled", "running", "completed"], {"exit_code": 0}, [], []
        finish_at = None
        if action["ref"] == "core.echo":
            stdout = [str(parameters.get("message", "")) + "\n"]
            result = {"stdout": stdout[0], "exit_code": 0}
        elif action["ref"] == "core.fail":
            statuses[-1], result, stderr = "failed", {"error": "boom", "exit_code": 1}, ["boom\n"]
        elif action["ref"] == "core.sleep" and parameters.get("seconds"):  # runs that long, a tick a second
            finish_at = time.time() + float(parameters["seconds"])
        elif action["ref"] == "core.sleep":
            statuses = ["scheduled", "running"]
        elif action["ref"] == "core.noisy":
            stdout = ["line %d\n" % n for n in range(1, 11)]
        with self.lock:
            self.executions[eid] = execution
            self.plans[eid] = {"statuses": statuses, "result": result, "pending": {"stdout": stdout, "stderr": stderr},
                               "logs": {"stdout": b"", "stderr": b""}, "finish_at": finish_at,
                               "started": time.time(), "ticks": 0}
        return execution

    def advance(self, eid):
        """One step of an execution's life; at the end its result and all its output."""
        with self.lock:
            execution, plan = self.executions[eid], self.plans[eid]
            if not plan["statuses"] or execution["status"] in TERMINAL:
                return
            if plan["finish_at"] and execution["status"] == "running":
                now = time.time()
                while plan["ticks"] < min(now, plan["finish_at"]) - plan["started"]:
                    plan["ticks"] += 1
                    plan["pending"]["stdout"].append("tick %d\n" % plan["ticks"])
                if now < plan["finish_at"]:
                    return
            execution["status"] = plan["statuses"].pop(0)
            execution["updated"] = self.stamp()
            if execution["status"] == "running":
                execution["started_at"] = execution["updated"]
            if execution["status"] in TERMINAL:
                execution["result"] = plan["result"]
                for name, chunks in plan["pending"].items():
                    plan["logs"][name] += "".join(chunks).encode()
                    del chunks[:]

    def execution(self, eid):
        execution = self.executions.get(int(eid))
        if execution is None:
            return None, api_error(404, "Execution with ID %s not found" % eid, "NOT_FOUND")
        return execution, None

    @route("GET", r"/api/v1/executions/(?P<eid>\d+)", query="include_secret_values")
    def executions_show(self, req, eid):
        execution, error = self.execution(eid)
        if error:
            return error
        self.advance(execution["id"])
        return 200, envelope(execution)

    @route("GET", r"/api/v1/executions",
           query="status action_ref pack_name rule_ref trigger_ref trace_tag executor result_contains "
                 "enforcement parent top_level_only include_total page per_page")
    def executions_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = []
        for e in sorted(self.executions.values(), key=lambda e: (e["created"], e["id"]), reverse=True):
            action = q.get("action_ref")
            if action and not (e["action_ref"] == action or (action.endswith(".*") and
                                                             e["action_ref"].startswith(action[:-1]))):
                continue
            if q.get("pack_name") and not e["action_ref"].startswith(q["pack_name"] + "."):
                continue
            if any(q.get(k) and e.get(k) != q[k] for k in ("status", "rule_ref", "trigger_ref", "trace_tag")):
                continue
            if q.get("top_level_only") == "true" and e["parent"] is not None:
                continue
            if q.get("enforcement") and str(e.get("enforcement")) != q["enforcement"]:
                continue
            if q.get("result_contains") and q["result_contains"].lower() not in json.dumps(e["result"]).lower():
                continue
            rows.append({k: e[k] for k in EXECUTION_SUMMARY_FIELDS})
        return self.paginate(req, rows, "per_page", totals=q.get("include_total") == "true")

    @route("GET", r"/api/v1/executions/stats")
    def executions_stats(self, req):
        """routes/executions.rs: counts by status, requested/scheduling/scheduled as pending,
        canceling as cancelled."""
        names = {"requested": "pending", "scheduling": "pending", "scheduled": "pending", "canceling": "cancelled"}
        stats = dict.fromkeys(("total", "completed", "failed", "running", "pending", "cancelled", "timeout",
                               "abandoned"), 0)
        for e in self.executions.values():
            stats["total"] += 1
            stats[names.get(e["status"], e["status"])] += 1
        return 200, envelope(stats)

    @route("POST", r"/api/v1/executions/(?P<eid>\d+)/reschedule", body="")
    def executions_reschedule(self, req, eid):
        """routes/executions.rs: only a requested execution, at most three times (409 otherwise)."""
        execution, error = self.execution(eid)
        if error:
            return error
        if execution["status"] != "requested":
            return api_error(409, "Execution %s is in status '%s' and cannot be rescheduled; only requested executions "
                             "are eligible" % (eid, execution["status"]), "CONFLICT")
        attempts = execution["reschedules"] = execution.get("reschedules", 0) + 1
        if attempts > 3:
            return api_error(409, "Execution %s is not eligible for reschedule because it is no longer requested, is "
                             "admission-queued, or has reached the reschedule attempt limit" % eid, "CONFLICT")
        return 200, envelope({"message": "Execution request republished; pending scheduling", "attempt_count": attempts,
                              "last_attempt_at": self.stamp(), "execution": execution})

    @route("POST", r"/api/v1/executions/(?P<eid>\d+)/cancel", body="")
    def executions_cancel(self, req, eid):
        execution, error = self.execution(eid)
        if error:
            return error
        if execution["status"] in TERMINAL:
            return api_error(409, "Execution %s cannot be cancelled (status: %s)" % (eid, execution["status"]),
                             "CONFLICT")
        execution["status"] = "canceling" if execution["status"] == "running" else "cancelled"
        self.plans[execution["id"]]["statuses"] = ["cancelled"]
        return 200, envelope(execution)

    @route("GET", r"/api/v1/traces/(?P<tag>[^/]+)")
    def traces_show(self, req, tag):
        executions = [{k: e[k] for k in EXECUTION_SUMMARY_FIELDS} for e in self.executions.values()
                      if e.get("trace_tag") == tag]
        if not executions:
            return api_error(404, "No trace found for tag '%s'" % tag, "NOT_FOUND")
        return 200, envelope({"trace_tag": tag, "origins": ["manual"], "executions": executions, "enforcements": [],
                              "events": [], "queue_dispatches": [], "queue_items": []})

    @route("GET", r"/api/v1/executions/stream", query="execution_id")
    def executions_stream(self, req):
        """Every execution's status changes as they happen (the API's broadcast of the
        notifier's execution events), optionally for one execution_id; keep-alive comments
        while quiet. stream_faults: "drop" after the next event, or a data line to send."""
        only = req.query.get("execution_id", [None])[0]
        with self.lock:
            fault = self.stream_faults.pop(0) if self.stream_faults else None
        return 200, EventStream(self.execution_events(int(only) if only else None, fault))

    def execution_events(self, only, fault):
        with self.lock:
            known = {eid: e["status"] for eid, e in self.executions.items()}
        quiet = 0
        while True:
            time.sleep(0.05)
            with self.lock:
                ids = [eid for eid in self.executions if only in (None, eid)]
            if fault and fault != "drop":
                yield "data: %s\n\n" % fault
                fault = None
            for eid in ids:
                self.advance(eid)
                with self.lock:
                    execution = dict(self.executions[eid])
                if known.get(eid) != execution["status"]:
                    payload = {k: execution.get(k) for k in EXECUTION_SUMMARY_FIELDS + ("action", "started_at")}
                    payload.update(entity_type="execution", entity_id=eid, old_status=known.get(eid))
                    payload.pop("result", None)
                    known[eid], quiet = execution["status"], 0
                    yield "data: %s\n\n" % json.dumps({
                        "notification_type": "execution_status_changed", "entity_type": "execution",
                        "entity_id": eid, "payload": payload, "timestamp": self.stamp()})
                    if fault == "drop":
                        return
            quiet += 1
            if quiet % 10 == 0:
                yield ": keep-alive\n\n"

    @route("GET", r"/api/v1/executions/(?P<eid>\d+)/logs/(?P<stream>[^/]+)/stream", query="offset")
    def executions_log_stream(self, req, eid, stream):
        execution, error = self.execution(eid)
        if error:
            return error
        if stream not in ("stdout", "stderr"):
            return api_error(400, "Unsupported log stream '%s'. Expected 'stdout' or 'stderr'." % stream,
                             "BAD_REQUEST")
        offset = int(req.query.get("offset", ["0"])[0])
        return 200, EventStream(self.log_events(execution["id"], stream, offset, req.token))

    def log_events(self, eid, stream, offset, token):
        """The server's log stream: catch-up in 'content' events, a comment, then 'append'
        events while the execution runs, then 'done'. log_drops[eid] = (n, revoke) closes
        the connection after n content/append events, once, revoking the token if asked."""
        plan, sent = self.plans[eid], 0
        drop_after, revoke = self.log_drops.pop(eid, (None, False))
        if revoke:
            self.revoked.add(token)
        log = plan["logs"][stream]
        yield sse_event("waiting", "Log file found" if log else "Waiting for log output")
        while offset < len(log):
            chunk = log[offset:offset + 8]
            offset += len(chunk)
            yield sse_event("content", chunk.decode("utf-8", "replace"), offset)
            sent += 1
            if sent == drop_after:
                return
        yield ": initial-catchup-complete\n\n"
        idle = 0
        while True:
            time.sleep(0.01)
            with self.lock:
                pending = plan["pending"][stream]
                chunk = pending.pop(0).encode() if pending else None
                if chunk:
                    plan["logs"][stream] += chunk
                log = plan["logs"][stream]
            if offset < len(log):
                chunk = log[offset:]
                offset = len(log)
                yield sse_event("append", chunk.decode("utf-8", "replace"), offset)
                sent, idle = sent + 1, 0
                if sent == drop_after:
                    return
            elif self.executions[eid]["status"] in TERMINAL and not plan["pending"][stream]:
                idle += 1
                if idle >= 2:
                    yield sse_event("done", "Execution complete")
                    return
                yield sse_event("waiting", "Waiting for log output")
            else:
                self.advance(eid)


# === Fake server: inquiries ==================================================

class FakeInquiries(FakeResources):
    """Inquiries an execution asks, and their responses."""

    def seed_inquiries(self):
        approve = {"type": "object", "properties": {"approved": {"type": "boolean"}}, "required": ["approved"]}
        self.inquiries = {
            1: self.new_inquiry(1, 7, "Deploy build 42 to production?", purpose="approval", schema=approve, options=[
                {"ref": "approve", "label": "Approve", "style": "primary", "response": {"approved": True}},
                {"ref": "reject", "label": "Reject", "style": "danger", "response": {"approved": False}}]),
            2: self.new_inquiry(2, 8, "Which region?", status="responded", response={"region": "eu"}, assigned_to=1),
            3: self.new_inquiry(3, 7, "Zoe's call", assigned_to=3)}

    def new_inquiry(self, iid, execution, prompt, status="pending", purpose=None, schema=None, options=None,
                    response=None, assigned_to=None):
        stamp = self.stamp()
        return {"id": iid, "created_by_execution": execution, "workflow_execution": None, "workflow_task_name": None,
                "purpose": purpose, "prompt": prompt, "response_schema": schema, "response_options": options or [],
                "assigned_to": assigned_to, "status": status, "response": response, "timeout_at": None,
                "responded_by": None, "responded_at": None, "created": stamp, "updated": stamp}

    @route("GET", r"/api/v1/inquiries",
           query="status created_by_execution execution assigned_to workflow_action_ref workflow_pack_ref "
                 "offset limit")
    def inquiries_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        limit, offset = max(1, min(500, int(q.get("limit", 50)))), int(q.get("offset", 0))
        rows = [i for _, i in sorted(self.inquiries.items())
                if (not q.get("status") or i["status"] == q["status"]) and
                (not q.get("created_by_execution") or i["created_by_execution"] == int(q["created_by_execution"])) and
                (not q.get("assigned_to") or i["assigned_to"] == int(q["assigned_to"]))]
        items = [{"id": i["id"], "created_by_execution": i["created_by_execution"], "prompt": i["prompt"],
                  "assigned_to": i["assigned_to"], "status": i["status"], "has_response": i["response"] is not None,
                  "timeout_at": i["timeout_at"], "created": i["created"]} for i in rows[offset:offset + limit]]
        return 200, {"items": items, "pagination": {"page": offset // limit + 1, "page_size": limit,
                                                    "has_previous": offset > 0, "has_next": offset + limit < len(rows)}}

    def inquiry(self, iid):
        inquiry = self.inquiries.get(int(iid))
        return (inquiry, None) if inquiry else (None, api_error(404, "Inquiry with ID %s not found" % iid, "NOT_FOUND"))

    @route("GET", r"/api/v1/inquiries/(?P<iid>\d+)")
    def inquiries_show(self, req, iid):
        inquiry, error = self.inquiry(iid)
        return error or (200, envelope(inquiry))

    @route("POST", r"/api/v1/inquiries/(?P<iid>\d+)/respond", body="response")
    def inquiries_respond(self, req, iid):
        inquiry, error = self.inquiry(iid)
        if error:
            return error
        if inquiry["status"] != "pending":
            return api_error(409, "Inquiry is no longer pending", "CONFLICT")
        responder = int(req.claims["sub"])
        if inquiry["assigned_to"] is not None and inquiry["assigned_to"] != responder:
            return api_error(403, "Inquiry %s is assigned to identity %s and can only be answered by them"
                             % (iid, inquiry["assigned_to"]), "FORBIDDEN")
        response = (req.json() or {}).get("response")
        schema = inquiry["response_schema"] or {}
        missing = [k for k in schema.get("required", []) if not isinstance(response, dict) or k not in response]
        if missing:
            return api_error(422, "Response does not match the inquiry's schema: '%s' is required" % missing[0],
                             "UNPROCESSABLE_ENTITY")
        inquiry.update(status="responded", response=response, responded_by=responder, responded_at=self.stamp(),
                       updated=self.stamp())
        return 200, envelope(inquiry, "Inquiry responded successfully")

    @route("POST", r"/api/v1/inquiries", body="*")
    def inquiries_create(self, req):
        if req.claims.get("token_type") != "execution":
            return api_error(403, "Workflow inquiries must be created with an execution token", "FORBIDDEN")
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return 422, "Failed to deserialize the JSON body into the target type: missing field `prompt`"
        iid = max(self.inquiries) + 1
        inquiry = self.new_inquiry(iid, req.claims["execution_id"], body["prompt"], purpose=body.get("purpose"),
                                   schema=body.get("response_schema"), assigned_to=body.get("assigned_to"))
        self.inquiries[iid] = inquiry
        return 201, envelope({"inquiry": inquiry, "response_options": []}, "Inquiry created successfully")

    @route("POST", r"/api/v1/inquiries/(?P<iid>\d+)/cancel", body="")
    def inquiries_cancel(self, req, iid):
        inquiry, error = self.inquiry(iid)
        if error:
            return error
        if req.claims.get("execution_id") != inquiry["created_by_execution"]:
            return api_error(403, "Only the execution that created an inquiry can cancel it", "FORBIDDEN")
        if inquiry["status"] != "pending":
            return api_error(409, "Inquiry is no longer pending", "CONFLICT")
        inquiry.update(status="cancelled", updated=self.stamp())
        return 200, envelope(inquiry)


# === Fake server: artifacts ==================================================

class FakeArtifacts(FakeResources):
    """Artifacts and their versions (JSON or uploaded files)."""

    def seed_artifacts(self):
        self.artifacts, self.artifact_versions = {}, {}
        self.new_artifact("core.echo.stdout.log", owner="core.echo", name="stdout", content_type="text/plain",
                          versions=[b"hello world\n", b"hello again\n"])
        self.new_artifact("reports.summary", owner="reports", type="file_datatable", visibility="public",
                          content_type="application/json")

    def new_artifact(self, ref, owner, scope="action", type="file_text", visibility="private", name=None,
                     content_type=None, versions=(), **fields):
        aid = len(self.artifacts) + 1
        stamp = self.stamp()
        self.artifacts[aid] = dict({"id": aid, "ref": ref, "scope": scope, "owner": owner, "type": type,
                                    "visibility": visibility, "retention_policy": "versions", "retention_limit": 5,
                                    "name": name, "description": None, "content_type": content_type,
                                    "size_bytes": None, "execution": None, "data": None,
                                    "created": stamp, "updated": stamp}, **fields)
        self.artifact_versions[aid] = []
        for content in versions:
            self.add_version(aid, content, content_type)
        return self.artifacts[aid]

    def add_version(self, aid, content, content_type, created_by=None, meta=None, content_json=None):
        versions = self.artifact_versions[aid]
        number = max([v["version"] for v in versions] or [0]) + 1
        version = {"id": 1000 * aid + number, "artifact": aid, "version": number, "content_type": content_type,
                   "size_bytes": len(content), "content_json": content_json, "file_path": None, "meta": meta,
                   "created_by": created_by, "created": self.stamp(), "content": content}
        versions.append(version)
        self.artifacts[aid]["size_bytes"] = len(content)
        return version

    def artifact(self, aid):
        artifact = self.artifacts.get(int(aid))
        return (artifact, None) if artifact else (None, api_error(404, "Artifact with ID %s not found" % aid,
                                                                   "NOT_FOUND"))

    @route("GET", r"/api/v1/artifacts", query="scope owner type visibility execution name page per_page")
    def artifacts_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [a for _, a in sorted(self.artifacts.items())
                if all(not q.get(k) or str(a.get(k)) == q[k] for k in ("scope", "owner", "type", "visibility", "execution"))
                and (not q.get("name") or q["name"].lower() in (a.get("name") or "").lower())]
        fields = ("id", "ref", "type", "visibility", "name", "content_type", "size_bytes", "scope", "owner",
                  "created", "updated")
        return self.paginate(req, [{k: a[k] for k in fields} for a in rows], "per_page")

    @route("GET", r"/api/v1/artifacts/(?P<aid>\d+)")
    def artifacts_show(self, req, aid):
        artifact, error = self.artifact(aid)
        return error or (200, envelope(artifact))

    @route("GET", r"/api/v1/artifacts/ref/(?P<ref>.+)")
    def artifacts_show_ref(self, req, ref):
        found = [a for a in self.artifacts.values() if a["ref"] == ref]
        return (200, envelope(found[0])) if found else api_error(404, "Artifact '%s' not found" % ref, "NOT_FOUND")

    @route("POST", r"/api/v1/artifacts",
           body="ref scope owner type visibility retention_policy retention_limit name description "
                "content_type")
    def artifacts_create(self, req):
        body = req.json() or {}
        if not str(body.get("ref") or "").strip():
            return api_error(400, "Artifact ref must not be empty", "BAD_REQUEST")
        if any(a["ref"] == body["ref"] for a in self.artifacts.values()):
            return api_error(409, "Artifact with ref '%s' already exists" % body["ref"], "CONFLICT")
        fields = {k: body[k] for k in ("retention_policy", "retention_limit", "description") if k in body}
        artifact = self.new_artifact(body["ref"], body["owner"], body.get("scope", "action"), body.get("type"),
                                     body.get("visibility") or "private", body.get("name"), body.get("content_type"),
                                     **fields)
        return 201, envelope(artifact, "Artifact created successfully")

    @route("DELETE", r"/api/v1/artifacts/(?P<aid>\d+)")
    def artifacts_delete(self, req, aid):
        artifact, error = self.artifact(aid)
        if error:
            return error
        del self.artifacts[artifact["id"]], self.artifact_versions[artifact["id"]]
        return 200, {"success": True, "message": "Artifact deleted successfully"}

    def artifact_version(self, aid, number):
        artifact, error = self.artifact(aid)
        if error:
            return None, error
        found = [v for v in self.artifact_versions[artifact["id"]] if v["version"] == int(number)]
        return (found[0], None) if found else (None, api_error(
            404, "Version %s of artifact %s not found" % (number, aid), "NOT_FOUND"))

    @route("GET", r"/api/v1/artifacts/(?P<aid>\d+)/versions")
    def artifacts_versions(self, req, aid):
        artifact, error = self.artifact(aid)
        if error:
            return error
        return 200, envelope([{k: v for k, v in version.items() if k not in ("content", "content_json")}
                              for version in reversed(self.artifact_versions[artifact["id"]])])

    @route("GET", r"/api/v1/artifacts/(?P<aid>\d+)/versions/(?P<number>\d+)")
    def artifacts_version_show(self, req, aid, number):
        version, error = self.artifact_version(aid, number)
        return error or (200, envelope({k: v for k, v in version.items() if k != "content"}))

    @route("POST", r"/api/v1/artifacts/(?P<aid>\d+)/versions", body="content content_type meta created_by")
    def artifacts_version_json(self, req, aid):
        artifact, error = self.artifact(aid)
        if error:
            return error
        body = req.json() or {}
        version = self.add_version(artifact["id"], json.dumps(body.get("content")).encode(),
                                   body.get("content_type", "application/json"), body.get("created_by"),
                                   body.get("meta"), body.get("content"))
        return 201, envelope({k: v for k, v in version.items() if k != "content"}, "Version created successfully")

    @route("POST", r"/api/v1/artifacts/(?P<aid>\d+)/versions/upload", body="*")
    def artifacts_upload(self, req, aid):
        artifact, error = self.artifact(aid)
        if error:
            return error
        fields, files = parse_multipart(req.body, req.headers.get("Content-Type", ""))
        if "file" not in files:
            return api_error(400, "No file provided in upload", "BAD_REQUEST")
        filename, content_type, content = files["file"]
        meta = json.loads(fields["meta"]) if "meta" in fields else None
        version = self.add_version(artifact["id"], content, fields.get("content_type") or content_type,
                                   fields.get("created_by"), meta)
        version["uploaded_name"] = filename
        return 201, envelope({k: v for k, v in version.items() if k not in ("content", "uploaded_name")},
                             "Version uploaded successfully")

    @route("DELETE", r"/api/v1/artifacts/(?P<aid>\d+)/versions/(?P<number>\d+)")
    def artifacts_version_delete(self, req, aid, number):
        version, error = self.artifact_version(aid, number)
        if error:
            return error
        self.artifact_versions[int(aid)].remove(version)
        return 200, {"success": True, "message": "Version deleted successfully"}

    @route("GET", r"/api/v1/artifacts/(?P<aid>\d+)/download")
    @route("GET", r"/api/v1/artifacts/(?P<aid>\d+)/versions/(?P<number>\d+)/download")
    def artifacts_download(self, req, aid, number=None):
        if number is None:
            artifact, error = self.artifact(aid)
            versions = self.artifact_versions[artifact["id"]] if artifact else []
            if not error and not versions:
                error = api_error(404, "Artifact %s has no versions" % aid, "NOT_FOUND")
            version = versions[-1] if versions else None
        else:
            version, error = self.artifact_version(aid, number)
        if error:
            return error
        artifact = self.artifacts[int(aid)]
        name = "%s_v%d%s" % (artifact["ref"].replace(".", "_"), version["version"],
                             ".txt" if (version["content_type"] or "").startswith("text/") else ".bin")
        return 200, Download(version["content"], version["content_type"] or "application/octet-stream",
                             'attachment; filename="%s"' % name)


# === Fake server: identities =================================================

class FakeIdentities(FakeResources):
    """Identities, their roles, freezing."""

    def seed_identities(self, stamp):
        self.identities = {
            1: {"id": 1, "login": "admin", "display_name": "Administrator", "frozen": False, "attributes": {},
                "roles": [{"id": 11, "identity_id": 1, "role": "admin", "source": "local", "managed": False,
                           "created": stamp, "updated": stamp}],
                "direct_permissions": [{"id": 21, "identity_id": 1, "permission_set_id": 5,
                                        "permission_set_ref": "core.admin", "created": stamp}]},
            3: {"id": 3, "login": "zoe", "display_name": "Zoë Ørsted", "frozen": False, "attributes": {"team": "ops"},
                "roles": [{"id": 31, "identity_id": 3, "role": "operators", "source": "oidc", "managed": True,
                           "created": stamp, "updated": stamp}], "direct_permissions": []}}

    @route("GET", r"/api/v1/identities", query="login page page_size")
    def identities_list(self, req):
        """routes/permissions.rs: pagination only (no login filter)."""
        rows = [{"id": i["id"], "login": i["login"], "display_name": i["display_name"], "frozen": i["frozen"],
                 "roles": [r["role"] for r in i["roles"]]} for _, i in sorted(self.identities.items())]
        return self.paginate(req, rows)

    def identity(self, iid):
        identity = self.identities.get(int(iid))
        return (identity, None) if identity else (None, api_error(404, "Identity %s not found" % iid, "NOT_FOUND"))

    @route("GET", r"/api/v1/identities/(?P<iid>\d+)")
    def identities_show(self, req, iid):
        identity, error = self.identity(iid)
        return error or (200, envelope(identity_answer(identity)))

    @route("POST", r"/api/v1/identities", body="login display_name password attributes")
    def identities_create(self, req):
        """routes/permissions.rs: login 3..255, password 8..128 (422), 201, 409 on a login
        that exists; a password given makes the identity able to log in."""
        body = req.json() if req.body else None
        body = body if isinstance(body, dict) else {}
        login, password = body.get("login"), body.get("password")
        if isinstance(password, str):
            self.received.add(password)
        problem = identity_problem(body, creating=True)
        if problem:
            return api_error(422, problem, "VALIDATION_ERROR")
        with self.lock:
            if any(i["login"] == login for i in self.identities.values()) or login in self.users:
                return api_error(409, "Identity with login '%s' already exists" % login, "CONFLICT")
            iid = self.new_id()
            identity = {"id": iid, "login": login, "display_name": body.get("display_name"), "frozen": False,
                        "attributes": body.get("attributes") or {}, "roles": [], "direct_permissions": []}
            self.identities[iid] = identity
            if password is not None:
                self.users[login] = {"id": iid, "password": password, "display_name": identity["display_name"]}
        return 201, envelope(identity_answer(identity))

    @route("PUT", r"/api/v1/identities/(?P<iid>\d+)", body="display_name password attributes frozen")
    def identities_update(self, req, iid):
        identity, error = self.identity(iid)
        if error:
            return error
        body = req.json() if req.body else None
        body = body if isinstance(body, dict) else {}
        if isinstance(body.get("password"), str):
            self.received.add(body["password"])
        problem = identity_problem(body, creating=False)
        if problem:
            return api_error(422, problem, "VALIDATION_ERROR")
        with self.lock:
            for key in ("display_name", "attributes", "frozen"):
                if body.get(key) is not None:
                    identity[key] = body[key]
            if body.get("password") is not None:
                self.users[identity["login"]] = {"id": identity["id"], "password": body["password"],
                                                 "display_name": identity["display_name"]}
        return 200, envelope(identity_answer(identity))

    @route("DELETE", r"/api/v1/identities/(?P<iid>\d+)")
    def identities_delete(self, req, iid):
        identity, error = self.identity(iid)
        if str(req.claims.get("sub")) == str(iid):
            return api_error(400, "Refusing to delete the currently authenticated identity", "BAD_REQUEST")
        if error:
            return error
        with self.lock:
            del self.identities[identity["id"]]
            self.users.pop(identity["login"], None)
        return 200, envelope({"success": True, "message": "Identity deleted successfully"})

    @route("POST", r"/api/v1/identities/(?P<iid>\d+)/roles", body="role")
    def identities_add_role(self, req, iid):
        identity, error = self.identity(iid)
        if error:
            return error
        role = (req.json() or {}).get("role")
        if any(r["role"] == role for r in identity["roles"]):
            return api_error(409, "Identity already has role '%s'" % role, "CONFLICT")
        assignment = {"id": self.new_id(), "identity_id": identity["id"], "role": role, "source": "local",
                      "managed": False, "created": self.stamp(), "updated": self.stamp()}
        identity["roles"].append(assignment)
        return 201, envelope(assignment)

    @route("DELETE", r"/api/v1/identities/roles/(?P<aid>\d+)")
    def identities_remove_role(self, req, aid):
        for identity in self.identities.values():
            for assignment in identity["roles"]:
                if assignment["id"] == int(aid):
                    identity["roles"].remove(assignment)
                    return 200, {"success": True, "message": "Role assignment deleted successfully"}
        return api_error(404, "Role assignment %s not found" % aid, "NOT_FOUND")

    @route("POST", r"/api/v1/identities/(?P<iid>\d+)/(?P<action>freeze|unfreeze)", body="")
    def identities_freeze(self, req, iid, action):
        identity, error = self.identity(iid)
        if error:
            return error
        identity["frozen"] = action == "freeze"
        return 200, envelope(identity)


# === Fake server: permissions ================================================

class FakePermissions(FakeResources):
    """Permission sets and their assignments (direct ones live in the identities)."""

    def seed_permissions(self, stamp):
        self.permission_sets = {
            5: {"id": 5, "ref": "core.admin", "pack_ref": "core", "label": "Admin", "description": "Everything",
                "grants": [{"resource": "packs", "actions": ["read", "create"]}], "retired_at": None,
                "management_origin": "pack", "roles": [{"id": 51, "permission_set_id": 5,
                                                         "permission_set_ref": "core.admin", "role": "admins",
                                                         "created": stamp}]},
            6: {"id": 6, "ref": "ops.operator", "pack_ref": None, "label": "Operator", "description": None,
                "grants": [{"resource": "executions", "actions": ["read"]}], "retired_at": None,
                "management_origin": "manual", "roles": []},
            7: {"id": 7, "ref": "system.root", "pack_ref": None, "label": "Root", "description": None,
                "grants": [], "retired_at": None, "management_origin": "platform", "roles": []},
            8: {"id": 8, "ref": "old.viewer", "pack_ref": "old", "label": "Viewer", "description": None,
                "grants": [], "retired_at": stamp, "management_origin": "pack", "roles": []}}

    def permission_set_by_ref(self, ref):
        found = [p for p in self.permission_sets.values() if p["ref"] == ref]
        return (found[0], None) if found else (None, api_error(404, "Permission set '%s' not found" % ref,
                                                                 "NOT_FOUND"))

    @route("GET", r"/api/v1/permissions/sets", query="pack_ref include_retired")
    def permission_sets_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        return 200, [p for _, p in sorted(self.permission_sets.items())  # a bare array, as the server sends
                     if (q.get("include_retired") == "true" or not p["retired_at"])
                     and q.get("pack_ref") in (None, p["pack_ref"])]

    @route("GET", r"/api/v1/permissions/sets/by-ref/" + REF)
    def permission_sets_show(self, req, ref):
        found, error = self.permission_set_by_ref(ref)
        return error or (200, envelope(found))

    @route("PUT", r"/api/v1/permissions/sets/(?P<sid>\d+)", query="dry_run", body="label description grants")
    def permission_sets_update(self, req, sid):
        found = self.permission_sets.get(int(sid))
        if not found:
            return api_error(404, "Permission set '%s' not found" % sid, "NOT_FOUND")
        body = req.json() or {}
        if not isinstance(body.get("grants"), list):
            return api_error(422, "grants: expected an array", "VALIDATION_ERROR")
        updated = dict(found, grants=body["grants"])
        for key in ("label", "description"):
            if body.get(key) is not None:
                updated[key] = body[key]
        if req.query.get("dry_run") != ["true"]:
            self.permission_sets[found["id"]] = updated
        return 200, envelope(updated)

    def bindings(self):
        rows = []
        for identity in self.identities.values():
            for a in identity["direct_permissions"]:
                rows.append({"id": a["id"], "permission_set_id": a["permission_set_id"],
                             "permission_set_ref": a["permission_set_ref"], "created": a["created"],
                             "target": {"type": "identity", "identity_id": identity["id"], "login": identity["login"]}})
        for found in self.permission_sets.values():
            for r in found["roles"]:
                rows.append({"id": r["id"], "permission_set_id": found["id"], "permission_set_ref": found["ref"],
                             "created": r["created"], "target": {"type": "role", "role": r["role"]}})
        return sorted(rows, key=lambda row: row["id"])

    @route("GET", r"/api/v1/permissions/assignments",
           query="identity_id identity_login role permission_set_ref page page_size")
    def assignments_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [b for b in self.bindings()
                if q.get("identity_login") in (None, b["target"].get("login"))
                and q.get("identity_id") in (None, str(b["target"].get("identity_id")))
                and q.get("role") in (None, b["target"].get("role"))
                and q.get("permission_set_ref") in (None, b["permission_set_ref"])]
        return self.paginate(req, rows)

    @route("POST", r"/api/v1/permissions/assignments", body="identity_id identity_login permission_set_ref")
    def assignments_create(self, req):
        body = req.json() or {}
        identity, error = self.identity(body.get("identity_id") or 0)
        found, error = (None, error) if error else self.permission_set_by_ref(body.get("permission_set_ref"))
        if error:
            return error
        if any(a["permission_set_id"] == found["id"] for a in identity["direct_permissions"]):
            return api_error(409, "Permission assignment already exists", "CONFLICT")
        assignment = {"id": self.new_id(), "identity_id": identity["id"], "permission_set_id": found["id"],
                      "permission_set_ref": found["ref"], "created": self.stamp()}
        identity["direct_permissions"].append(assignment)
        return 201, envelope(assignment)

    @route("DELETE", r"/api/v1/permissions/assignments/(?P<aid>\d+)")
    def assignments_delete(self, req, aid):
        for identity in self.identities.values():
            for a in identity["direct_permissions"]:
                if a["id"] == int(aid):
                    identity["direct_permissions"].remove(a)
                    return 200, envelope({"success": True, "message": "Permission assignment deleted successfully"})
        return api_error(404, "Permission assignment '%s' not found" % aid, "NOT_FOUND")

    @route("POST", r"/api/v1/permissions/sets/(?P<sid>\d+)/roles", body="role")
    def set_roles_create(self, req, sid):
        found = self.permission_sets.get(int(sid))
        if not found:
            return api_error(404, "Permission set '%s' not found" % sid, "NOT_FOUND")
        role = (req.json() or {}).get("role")
        if any(r["role"] == role for r in found["roles"]):
            return api_error(409, "Role '%s' is already mapped to this permission set" % role, "CONFLICT")
        mapping = {"id": self.new_id(), "permission_set_id": found["id"], "permission_set_ref": found["ref"],
                   "role": role, "created": self.stamp()}
        found["roles"].append(mapping)
        return 201, envelope(mapping)

    @route("DELETE", r"/api/v1/permissions/sets/roles/(?P<rid>\d+)")
    def set_roles_delete(self, req, rid):
        for found in self.permission_sets.values():
            for r in found["roles"]:
                if r["id"] == int(rid):
                    found["roles"].remove(r)
                    return 200, envelope({"success": True,
                                          "message": "Permission set role assignment deleted successfully"})
        return api_error(404, "Permission set role assignment '%s' not found" % rid, "NOT_FOUND")


# === Fake server: work queues ================================================

class FakeQueues(FakeResources):
    """Work queues and their items."""

    def seed_work_queues(self, stamp):
        self.queues = {
            "core.inbox": {"id": 1, "ref": "core.inbox", "pack": 1, "pack_ref": "core", "is_adhoc": False,
                           "label": "Core Inbox", "description": "Work for core.echo", "enabled": True,
                           "accepting_new_items": True, "dispatch_action_ref": "core.echo", "trace_tag_template": None,
                           "reference_visibility": "restricted", "reference_allowed_pack_refs": ["ops", "deploy"],
                           "retired_at": None, "created": stamp, "updated": stamp},
            "adhoc.scratch": {"id": 2, "ref": "adhoc.scratch", "pack": None, "pack_ref": None, "is_adhoc": True,
                              "label": "Scratch", "description": None, "enabled": False, "accepting_new_items": True,
                              "dispatch_action_ref": "core.noop", "trace_tag_template": "scratch.{{ queue_item.id }}",
                              "reference_visibility": "public", "reference_allowed_pack_refs": [],
                              "retired_at": None, "created": stamp, "updated": stamp}}
        self.queue_items = {}
        for n, (key, status, payload, lease) in enumerate((
                ("order-1", "queued", {"order": 1, "customer": "alice"}, None),
                ("order-2", "leased", {"order": 2, "customer": "bob"}, "6b1f9c9e-2a8e-4a53-9d3c-7a1c2f3e4d5a"),
                (None, "retry", {"order": 3, "note": "x" * 120}, None)), start=1):
            self.queue_items[n] = {
                "id": n, "queue": 1, "queue_ref": "core.inbox", "item_key": key, "priority": 0, "status": status,
                "payload": payload, "metadata": {}, "trace_tag": None, "enqueue_source": "api",
                "requested_by_identity": 1, "requested_by_execution": None, "requested_by_enforcement": None,
                "leased_execution": 7 if lease else None, "lease_token": lease,
                "lease_expires_at": stamp if lease else None, "attempt_count": 1 if lease else 0,
                "last_error": None, "ack_summary": None, "created": stamp, "updated": stamp}

    def queue(self, ref):
        found = self.queues.get(ref)
        return (found, None) if found else (None, api_error(404, "Work queue '%s' not found" % ref, "NOT_FOUND"))

    @route("GET", r"/api/v1/queues", query="enabled is_adhoc search referencing_pack_ref page per_page")
    def queues_list(self, req, pack=None):
        if pack is not None and pack not in self.packs:
            return api_error(404, "Pack '%s' not found" % pack, "NOT_FOUND")
        q = {k: v[0] for k, v in req.query.items()}
        rows = [x for _, x in sorted(self.queues.items())
                if pack in (None, x["pack_ref"]) and q.get("enabled") in (None, str(x["enabled"]).lower())
                and q.get("is_adhoc") in (None, str(x["is_adhoc"]).lower())
                and (not q.get("search") or q["search"] in x["ref"] + x["label"])
                and (x["reference_visibility"] == "public" or q.get("referencing_pack_ref") in (None, x["pack_ref"])
                     or q.get("referencing_pack_ref") in x["reference_allowed_pack_refs"])]
        return self.paginate(req, rows, "per_page")

    @route("GET", r"/api/v1/packs/" + REF + "/queues",
           query="enabled is_adhoc search referencing_pack_ref page per_page")
    def pack_queues_list(self, req, ref):
        return self.queues_list(req, ref)

    @route("GET", r"/api/v1/queues/" + REF)
    def queues_show(self, req, ref):
        found, error = self.queue(ref)
        return error or (200, envelope(found))

    @route("PUT", r"/api/v1/queues/" + REF, body="enabled trace_tag_template")
    def queues_update(self, req, ref):
        found, error = self.queue(ref)
        if error:
            return error
        body = req.json() or {}
        for key in ("enabled", "trace_tag_template"):
            if key in body:
                found[key] = body[key]
        found["updated"] = self.stamp()
        return 200, envelope(found)

    @route("POST", r"/api/v1/queues/" + REF + "/items", body="payload item_key priority metadata trace_tag")
    def queue_items_create(self, req, ref):
        found, error = self.queue(ref)
        if error:
            return error
        body = req.json() or {}
        if "payload" not in body:
            return 422, "Failed to deserialize the JSON body into the target type: missing field `payload`"
        if not found["accepting_new_items"]:
            return api_error(409, "Work queue '%s' is not accepting new items" % ref, "CONFLICT")
        n = max(self.queue_items or [0]) + 1
        self.queue_items[n] = dict(self.queue_items.get(1) or {}, **{
            "id": n, "queue": found["id"], "queue_ref": ref, "item_key": body.get("item_key"),
            "priority": body.get("priority") or 0, "status": "queued", "payload": body["payload"],
            "metadata": body.get("metadata", {}), "trace_tag": body.get("trace_tag"), "enqueue_source": "api",
            "leased_execution": None, "lease_token": None, "lease_expires_at": None, "attempt_count": 0,
            "created": self.stamp(), "updated": self.stamp()})
        return 201, envelope(self.queue_items[n])

    @route("GET", r"/api/v1/queues/" + REF + "/items", query="item_key enqueue_source statuses page per_page")
    def queue_items_list(self, req, ref):
        found, error = self.queue(ref)
        if error:
            return error
        statuses = [s for v in req.query.get("statuses", []) for s in v.split(",") if s]
        q = {k: v[0] for k, v in req.query.items()}
        rows = [i for _, i in sorted(self.queue_items.items()) if i["queue_ref"] == ref
                and (not statuses or i["status"] in statuses) and q.get("item_key") in (None, i["item_key"])
                and q.get("enqueue_source") in (None, i["enqueue_source"])]
        return self.paginate(req, rows, "per_page")

    def queue_item(self, ref, iid):
        item = self.queue_items.get(int(iid))
        if not item or item["queue_ref"] != ref:
            return None, api_error(404, "Work queue item %s not found" % iid, "NOT_FOUND")
        if item["status"] != "queued":  # leased, retrying or finished items are the dispatcher's
            return None, api_error(409, "Queue item is not mutable in status %s" % item["status"], "CONFLICT")
        return item, None

    # one item: only PUT and DELETE (GET is 405), as in the server's routes/work_queues.rs
    @route("PUT", r"/api/v1/queues/" + REF + r"/items/(?P<iid>\d+)", body="priority payload metadata")
    def queue_item_update(self, req, ref, iid):
        item, error = self.queue_item(ref, iid)
        if error:
            return error
        body = req.json()
        if not isinstance(body, dict) or set(body) - {"priority", "payload", "metadata"}:
            return api_error(422, "Validation failed: priority, payload or metadata", "VALIDATION_ERROR")
        item.update(body, updated=self.stamp())
        return 200, envelope(item)

    @route("DELETE", r"/api/v1/queues/" + REF + r"/items/(?P<iid>\d+)")
    def queue_item_delete(self, req, ref, iid):
        item, error = self.queue_item(ref, iid)
        if error:
            return error
        item.update(status="cancelled", updated=self.stamp())
        return 200, {"success": True, "message": "Queue item deleted successfully"}

    def selected_items(self, req, ref):
        """The fake's selector: '$' is every pending item, '$.payload.KEY' those whose payload has KEY."""
        body = req.json() or {}
        selector = body.get("selector") or {}
        path = selector.get("path") or ""
        if not (path == "$" or path.startswith("$.payload.")) or not isinstance(selector.get("vars", {}), dict):
            return body, None, api_error(400, "Invalid SQL/JSONPath selector", "BAD_REQUEST")
        key = path[len("$.payload."):]
        return body, [i for _, i in sorted(self.queue_items.items()) if i["queue_ref"] == ref
                      and i["status"] in ("queued", "retry") and (path == "$" or key in i["payload"])], None

    @route("POST", r"/api/v1/queues/" + REF + "/items/query/preview", body="selector limit")
    def queue_items_preview(self, req, ref):
        found, error = self.queue(ref)
        body, items, error = (None, None, error) if error else self.selected_items(req, ref)
        if error:
            return error
        shown = items[:body.get("limit", 100)]
        return 200, envelope({"matched_count": len(items), "preview_count": len(shown), "items": shown})

    @route("POST", r"/api/v1/queues/" + REF + "/items/query/apply",
           body="selector operation payload_patch priority preview_limit")
    def queue_items_apply(self, req, ref):
        found, error = self.queue(ref)
        body, items, error = (None, None, error) if error else self.selected_items(req, ref)
        if error:
            return error
        operation = body.get("operation")
        if operation == "patch_payload" and not isinstance(body.get("payload_patch"), dict):
            return api_error(400, "payload_patch is required for patch_payload", "BAD_REQUEST")
        if operation == "reprioritize" and not isinstance(body.get("priority"), int):
            return api_error(400, "priority is required for reprioritize", "BAD_REQUEST")
        for item in items:
            if operation == "patch_payload":
                item["payload"] = dict(item["payload"], **body["payload_patch"])
            elif operation == "reprioritize":
                item["priority"] = body["priority"]
            else:
                item["status"] = "cancelled"
        shown = items[:body.get("preview_limit", 100)]
        return 200, envelope({"operation": operation, "matched_count": len(items), "affected_count": len(items),
                              "skipped_count": 0, "preview_count": len(shown), "items": shown})


# === Fake server: cache ======================================================

class FakeCache(FakeResources):
    """Cache namespaces (keyed by owner and name) and their generations."""

    def seed_cache(self, stamp):
        self.cache_namespaces, self.cache_generations = {}, {}
        users = self.new_cache_namespace("system", None, "users", freshness_target_seconds=3600)
        self.cache_namespaces[users]["active_generation"] = self.new_cache_generation(users, "active", [
            {"external_id": "u%d" % n, "value": {"name": "user %d" % n, "n": n}, "source_updated_at": stamp,
             "source_checksum": None} for n in range(1, 6)])
        self.new_cache_namespace("pack", "core", "hosts")

    def new_cache_namespace(self, owner_type, owner_ref, name, **policy):
        key = (owner_type, owner_ref, name)
        self.cache_namespaces[key] = dict({
            "id": len(self.cache_namespaces) + 1, "owner_type": owner_type, "owner_ref": owner_ref, "namespace": name,
            "active_generation": None, "freshness_target_seconds": None, "max_records_per_generation": None,
            "max_generation_bytes": None, "max_retained_bytes": None, "max_retained_generations": 3,
            "max_staging_generations": 2, "refresh_concurrency": "parallel", "stale": False,
            "refresh_health": "healthy", "record_count": None,
            "size_bytes": None, "created": self.stamp(), "updated": self.stamp()}, **policy)
        return key

    def new_cache_generation(self, key, status, entries=(), **fields):
        gid = 100 + len(self.cache_generations) + 1
        entries = [dict(e, size_bytes=len(json.dumps(e["value"]))) for e in entries]
        self.cache_generations[gid] = dict({
            "generation_id": gid, "namespace_id": self.cache_namespaces[key]["id"], "status": status,
            "client_refresh_id": "seed-%d" % gid, "expected_active_generation_id": None, "expected_chunk_count": 1,
            "expected_record_count": None, "expected_size_bytes": None, "record_count": len(entries),
            "size_bytes": sum(e["size_bytes"] for e in entries), "checksum_algorithm": None, "checksum": None,
            "source_revision": None, "created_by": 1, "created_by_execution": None, "created": self.stamp(),
            "sealed": None, "activated": None,
            "retired": None, "readable_until": None, "failed": None, "failure_reason": None,
            "key": key, "chunks": {0: entries} if entries else {}}, **fields)
        self.cache_namespaces[key].update(record_count=len(entries) or None)
        return gid

    def cache_scope(self, req, name):
        """The namespace the owner selector (query or body) and the name pick, or the error."""
        body = req.json() if req.method in ("POST", "PUT") else None
        source = body if isinstance(body, dict) else {k: v[0] for k, v in req.query.items()}
        owner_type, owner_ref = source.get("owner_type"), source.get("owner_ref")
        if owner_type not in ("system", "identity", "pack", "action", "sensor"):
            return None, api_error(400, "owner_type is required", "BAD_REQUEST")
        if (owner_type in ("system", "identity")) != (owner_ref is None):
            return None, api_error(400, "owner_ref does not fit owner_type '%s'" % owner_type, "BAD_REQUEST")
        key = (owner_type, owner_ref, name)
        if name is not None and key not in self.cache_namespaces:
            return None, api_error(404, "Cache namespace '%s' not found" % name, "NOT_FOUND")
        return key, None

    @staticmethod
    def public(generation):
        return {k: v for k, v in generation.items() if k not in ("key", "chunks")}

    def cache_entries(self, key, generation_id):
        namespace = self.cache_namespaces[key]
        gid = generation_id if generation_id is not None else namespace["active_generation"]
        generation = self.cache_generations.get(gid)
        if not generation or generation["key"] != key:
            return None, None, api_error(404, "Cache generation not found", "NOT_FOUND")
        return gid, [e for _, chunk in sorted(generation["chunks"].items()) for e in chunk], None

    @route("GET", r"/api/v1/cache/namespaces", query="owner_type owner_ref namespace freshness cursor limit")
    def cache_namespaces_list(self, req):
        key, error = self.cache_scope(req, None)
        if error:
            return error
        q = {k: v[0] for k, v in req.query.items()}
        rows = [n for k, n in sorted(self.cache_namespaces.items(), key=lambda item: item[1]["id"])
                if k[:2] == key[:2] and q.get("namespace", "").lower() in n["namespace"].lower()]
        return 200, {"namespaces": rows, "next_cursor": None}  # bare, as cache routes may answer

    @route("POST", r"/api/v1/cache/namespaces",
           body="owner_type owner_ref namespace freshness_target_seconds max_records_per_generation "
                "max_generation_bytes max_retained_bytes max_retained_generations max_staging_generations "
                "refresh_concurrency")
    def cache_namespaces_create(self, req):
        body = req.json() or {}
        key, error = self.cache_scope(req, None)
        if error:
            return error
        key = key[:2] + (body.get("namespace"),)
        if key in self.cache_namespaces:
            return api_error(409, "Cache namespace '%s' already exists" % key[2], "CONFLICT")
        policy = {k: v for k, v in body.items() if k.startswith(("max_", "freshness_", "refresh_concurrency"))}
        if policy.get("refresh_concurrency", "parallel") not in ("reuse", "conflict", "parallel"):
            return 422, "Failed to deserialize the JSON body into the target type: refresh_concurrency: unknown " \
                        "variant, expected one of `reuse`, `conflict`, `parallel`"
        return 201, envelope(self.cache_namespaces[self.new_cache_namespace(*key, **policy)])

    @route("GET", r"/api/v1/cache/namespaces/(?P<name>[^/]+)", query="owner_type owner_ref")
    def cache_namespace_show(self, req, name):
        key, error = self.cache_scope(req, name)
        return error or (200, envelope(self.cache_namespaces[key]))

    @route("PUT", r"/api/v1/cache/namespaces/(?P<name>[^/]+)",
           body="owner_type owner_ref freshness_target_seconds max_records_per_generation "
                "max_generation_bytes max_retained_bytes max_retained_generations max_staging_generations "
                "refresh_concurrency")
    def cache_namespace_update(self, req, name):
        key, error = self.cache_scope(req, name)
        if error:
            return error
        policy = {k: v for k, v in (req.json() or {}).items() if k.startswith(("max_", "freshness_",
                                                                               "refresh_concurrency"))}
        if policy.get("refresh_concurrency", "parallel") not in ("reuse", "conflict", "parallel"):
            return 422, "Failed to deserialize the JSON body into the target type: refresh_concurrency: unknown " \
                        "variant, expected one of `reuse`, `conflict`, `parallel`"
        self.cache_namespaces[key].update(policy, updated=self.stamp())
        return 200, envelope(self.cache_namespaces[key])

    @route("DELETE", r"/api/v1/cache/namespaces/(?P<name>[^/]+)", query="owner_type owner_ref")
    def cache_namespace_delete(self, req, name):
        key, error = self.cache_scope(req, name)
        if error:
            return error
        del self.cache_namespaces[key]
        return 204, None

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/entries/lookup",
           body="owner_type owner_ref external_id generation_id require_fresh")
    def cache_lookup(self, req, name):
        key, error = self.cache_scope(req, name)
        body = req.json() or {}
        gid, entries, error = (None, None, error) if error else self.cache_entries(key, body.get("generation_id"))
        if error:
            return error
        found = [e for e in entries if e["external_id"] == body.get("external_id")]
        return 200, envelope({"generation_id": gid, "item": found[0] if found else None, "stale": False})

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/entries/lookup-many",
           body="owner_type owner_ref external_ids generation_id require_fresh")
    def cache_lookup_many(self, req, name):
        key, error = self.cache_scope(req, name)
        body = req.json() or {}
        gid, entries, error = (None, None, error) if error else self.cache_entries(key, body.get("generation_id"))
        if error:
            return error
        wanted = body.get("external_ids") or []
        if len(wanted) > 1000:
            return api_error(400, "At most 1000 external ids", "BAD_REQUEST")
        by_id = {e["external_id"]: e for e in entries}
        return 200, envelope({"generation_id": gid, "items": [by_id[i] for i in wanted if i in by_id],
                              "missing_external_ids": [i for i in wanted if i not in by_id], "stale": False})

    @route("GET", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/entries",
           query="owner_type owner_ref generation cursor limit include_values")
    def cache_scan(self, req, name):
        key, error = self.cache_scope(req, name)
        q = {k: v[0] for k, v in req.query.items()}
        gid, entries, error = (None, None, error) if error else self.cache_entries(
            key, int(q["generation"]) if "generation" in q else None)
        if error:
            return error
        start, limit = int(q.get("cursor", "0") or 0), int(q.get("limit", "100"))
        page = entries[start:start + limit]
        more = start + limit < len(entries)
        return 200, envelope({"generation_id": gid, "items": page, "next_cursor": str(start + limit) if more else None,
                              "cursor_expires_at": "2026-12-01T00:00:00Z" if more else None,
                              "record_count": len(entries), "stale": False})

    @route("GET", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations", query="owner_type owner_ref cursor limit")
    def cache_generations_list(self, req, name):
        key, error = self.cache_scope(req, name)
        if error:
            return error
        rows = [self.public(g) for _, g in sorted(self.cache_generations.items()) if g["key"] == key]
        return 200, envelope({"generations": rows, "next_cursor": None})

    def cache_generation(self, req, name, gid):
        key, error = self.cache_scope(req, name)
        generation = self.cache_generations.get(int(gid)) if not error else None
        if not error and (not generation or generation["key"] != key):
            error = api_error(404, "Cache generation %s not found" % gid, "NOT_FOUND")
        return generation, error

    @route("GET", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations/(?P<gid>\d+)", query="owner_type owner_ref")
    def cache_generation_show(self, req, name, gid):
        generation, error = self.cache_generation(req, name, gid)
        return error or (200, envelope(self.public(generation)))

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations",
           body="owner_type owner_ref client_refresh_id expected_active_generation_id "
                "expected_chunk_count expected_record_count expected_size_bytes source_revision")
    def cache_begin(self, req, name):
        key, error = self.cache_scope(req, name)
        if error:
            return error
        body = req.json() or {}
        for gid, g in self.cache_generations.items():  # a retried begin is the same generation
            if g["key"] == key and g["client_refresh_id"] == body.get("client_refresh_id"):
                return 200, envelope(self.public(g))
        unpublished = [g for _, g in sorted(self.cache_generations.items())
                       if g["key"] == key and g["status"] in ("staging", "ready")]
        policy = self.cache_namespaces[key]["refresh_concurrency"]
        if unpublished and policy == "reuse":  # another writer's refresh answers, with its own refresh id
            return 200, envelope(self.public(unpublished[0]))
        if unpublished and policy == "conflict":
            return 409, {"error": "cache namespace already has an unpublished generation",
                         "code": "cache_refresh_in_progress",
                         "details": {"generation_id": unpublished[0]["generation_id"],
                                     "created_by_execution": unpublished[0]["created_by_execution"]}}
        execution = req.claims.get("execution_id") if req.claims.get("token_type") == "execution" else None
        gid = self.new_cache_generation(key, "staging", client_refresh_id=body.get("client_refresh_id"),
                                        created_by_execution=execution, **{
            k: body.get(k) for k in ("expected_active_generation_id", "expected_chunk_count", "expected_record_count",
                                     "expected_size_bytes", "source_revision")})
        self.cache_generations[gid].update(record_count=0, size_bytes=0)
        return 201, envelope(self.public(self.cache_generations[gid]))

    @route("PUT", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations/(?P<gid>\d+)/chunks/(?P<index>\d+)",
           body="owner_type owner_ref entries")
    def cache_upload(self, req, name, gid, index):
        generation, error = self.cache_generation(req, name, gid)
        if error:
            return error
        if generation["status"] != "staging":
            return api_error(409, "Generation %s is %s" % (gid, generation["status"]), "CONFLICT")
        entries = (req.json() or {}).get("entries") or []
        generation["chunks"][int(index)] = [dict(e, size_bytes=len(json.dumps(e["value"]))) for e in entries]
        return 200, envelope({"generation_id": int(gid), "chunk_index": int(index), "record_count": len(entries)})

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations/(?P<gid>\d+)/seal",
           body="owner_type owner_ref expected_chunk_count expected_record_count expected_size_bytes")
    def cache_seal(self, req, name, gid):
        generation, error = self.cache_generation(req, name, gid)
        if error:
            return error
        body = req.json() or {}
        records = sum(len(c) for c in generation["chunks"].values())
        if len(generation["chunks"]) != body.get("expected_chunk_count") or body.get("expected_record_count") not in (
                None, records):
            return api_error(422, "Uploaded chunks do not match the expected counts", "VALIDATION_ERROR")
        generation.update(status="ready", sealed=self.stamp(), record_count=records,
                          size_bytes=sum(e["size_bytes"] for c in generation["chunks"].values() for e in c))
        return 200, envelope(self.public(generation))

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations/(?P<gid>\d+)/promote",
           body="owner_type owner_ref expected_active_generation_id")
    def cache_promote(self, req, name, gid):
        generation, error = self.cache_generation(req, name, gid)
        if error:
            return error
        namespace = self.cache_namespaces[generation["key"]]
        if (req.json() or {}).get("expected_active_generation_id") != namespace["active_generation"]:
            return api_error(409, "The active generation is %s" % namespace["active_generation"], "CONFLICT")
        if generation["status"] != "ready":
            return api_error(409, "Generation %s is %s" % (gid, generation["status"]), "CONFLICT")
        generation.update(status="active", activated=self.stamp())
        namespace.update(active_generation=generation["generation_id"], record_count=generation["record_count"])
        return 200, envelope(self.public(generation))

    @route("POST", r"/api/v1/cache/namespaces/(?P<name>[^/]+)/generations/(?P<gid>\d+)/abandon",
           body="owner_type owner_ref")
    def cache_abandon(self, req, name, gid):
        generation, error = self.cache_generation(req, name, gid)
        if error:
            return error
        generation.update(status="abandoned")
        return 200, {}


# === Fake server: audit ======================================================

class FakeAudit(FakeResources):
    """Audit events and request chains."""

    def seed_audit(self):
        chain = "6f1c2e34-8a9b-4c1d-9e2f-0a1b2c3d4e5f"
        self.audit_events = [
            {"id": 1, "created": "2026-11-20T10:00:00Z", "category": "auth", "event_type": "auth.login",
             "outcome": "success", "actor_identity": 1, "actor_login": "admin", "actor_token_type": None,
             "actor_ip": "10.0.0.5", "user_agent": "attune.py", "resource_type": None, "resource_id": None,
             "resource_ref": None, "pack_ref": None, "http_method": "POST", "http_path": "/auth/login",
             "http_status": 200, "request_id": chain, "parent_event_id": None, "error": None,
             "details": {"password": "***", "method": "direct"}},
            {"id": 2, "created": "2026-11-20T10:00:01Z", "category": "pack", "event_type": "pack.created",
             "outcome": "success", "actor_identity": 1, "actor_login": "admin", "actor_token_type": "access",
             "actor_ip": "10.0.0.5", "user_agent": "attune.py", "resource_type": "packs", "resource_id": 4,
             "resource_ref": "ci", "pack_ref": "ci", "http_method": "POST", "http_path": "/api/v1/packs",
             "http_status": 201, "request_id": chain, "parent_event_id": 1, "error": None, "details": {}},
            {"id": 3, "created": "2026-11-21T08:30:00Z", "category": "rbac", "event_type": "rbac.denied",
             "outcome": "denied", "actor_identity": 3, "actor_login": None, "actor_token_type": "access",
             "actor_ip": None, "user_agent": None, "resource_type": "keys", "resource_id": None, "resource_ref": None,
             "pack_ref": None, "http_method": None, "http_path": None, "http_status": None,
             "request_id": "0b7d9a1e-3c4f-4e5a-8b6c-7d8e9f0a1b2c", "parent_event_id": None,
             "error": "missing keys:read", "details": None}]

    @route("GET", r"/api/v1/audit-events",
           query="category event_type outcome actor_login actor_identity resource_type resource_id "
                 "resource_ref http_method http_status http_path request_id created_after created_before "
                 "page per_page")
    def audit_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [e for e in reversed(self.audit_events)
                if all(not q.get(k) or str(e.get(k)) == q[k] for k in (
                    "category", "event_type", "outcome", "actor_login", "actor_identity", "resource_type",
                    "resource_id", "resource_ref", "http_method", "http_status", "http_path", "request_id"))
                and (not q.get("created_after") or e["created"] >= q["created_after"])
                and (not q.get("created_before") or e["created"] < q["created_before"])]
        return self.paginate(req, rows, "per_page")

    @route("GET", r"/api/v1/audit-events/(?P<eid>\d+)")
    def audit_show(self, req, eid):
        found = [e for e in self.audit_events if e["id"] == int(eid)]
        return (200, envelope(found[0])) if found else api_error(404, "Audit event %s not found" % eid, "NOT_FOUND")

    @route("GET", r"/api/v1/audit-events/by-request/(?P<rid>[^/]+)")
    def audit_chain(self, req, rid):
        if not re.match(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", rid):
            return api_error(400, "Invalid request id: expected a UUID", "BAD_REQUEST")
        return 200, envelope([e for e in self.audit_events if e["request_id"] == rid])


# === Fake server: policies ===================================================

class FakePolicies(FakeResources):
    """Execution policies."""

    def seed_policies(self, stamp):
        self.policies = {"core.limit": {
            "id": 1, "ref": "core.limit", "name": "Core limit", "description": "Two at a time", "enabled": True,
            "priority": 10, "scope": {"type": "pack", "pack_ref": "core"},
            "concurrency": {"limit": 2, "method": "enqueue", "parameters": {"group_by": ["host"]}},
            "rate_limit": {"max_executions": 30, "window_seconds": 60}, "quotas": [], "tags": ["ops"],
            "created": stamp, "updated": stamp}}

    @route("GET", r"/api/v1/policies", query="scope pack_ref action_ref enabled tag")
    def policies_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [p for _, p in sorted(self.policies.items())
                if (not q.get("scope") or p["scope"]["type"] == q["scope"])
                and (not q.get("pack_ref") or p["scope"].get("pack_ref") == q["pack_ref"])
                and (not q.get("action_ref") or p["scope"].get("action_ref") == q["action_ref"])
                and (not q.get("enabled") or str(p["enabled"]).lower() == q["enabled"])
                and (not q.get("tag") or q["tag"] in p["tags"])]
        return self.paginate(req, rows)

    @route("GET", r"/api/v1/policies/" + REF)
    def policies_show(self, req, ref):
        policy = self.policies.get(ref)
        return (200, envelope(policy)) if policy else api_error(404, "Policy '%s' not found" % ref, "NOT_FOUND")

    @route("POST", r"/api/v1/policies",
           body="ref name description enabled priority scope concurrency rate_limit quotas tags")
    def policies_create(self, req):
        body = req.json() or {}
        if body.get("ref") in self.policies:
            return api_error(409, "Policy with ref '%s' already exists" % body["ref"], "CONFLICT")
        stamp = self.stamp()
        policy = dict({"id": self.new_id(), "description": None, "concurrency": None, "rate_limit": None,
                       "quotas": [], "tags": [], "created": stamp, "updated": stamp}, **body)
        self.policies[body["ref"]] = policy
        return 201, envelope(policy, "Policy created successfully")

    @route("PUT", r"/api/v1/policies/" + REF,
           body="name description enabled priority concurrency rate_limit quotas tags")
    def policies_update(self, req, ref):
        policy = self.policies.get(ref)
        if not policy:
            return api_error(404, "Policy '%s' not found" % ref, "NOT_FOUND")
        policy.update(req.json() or {}, updated=self.stamp())
        return 200, envelope(policy, "Policy updated successfully")

    @route("DELETE", r"/api/v1/policies/" + REF)
    def policies_delete(self, req, ref):
        if self.policies.pop(ref, None) is None:
            return api_error(404, "Policy '%s' not found" % ref, "NOT_FOUND")
        return 200, {"success": True, "message": "Policy deleted successfully"}


# === Fake server: rules ======================================================

class FakeRules(FakeResources):
    """Rules."""

    def seed_rules(self):
        self.rules = {}
        for ref, trigger, action, enabled in (("examples.on_timer", "core.timer", "core.echo", True),
                                              ("linux.on_file", "linux.file_watch", "linux.uptime", False)):
            self.rules[ref] = self.new_rule(len(self.rules) + 1, {
                "ref": ref, "pack_ref": ref.split(".")[0], "label": ref.split(".")[1], "trigger_ref": trigger,
                "action_ref": action, "enabled": enabled, "conditions": {"all": []},
                "action_params": {"message": "tick"}, "trigger_params": {"interval": 60}})

    def new_rule(self, rule_id, fields):
        rule = {"id": rule_id, "ref": None, "pack": None, "pack_ref": None, "label": None, "description": None,
                "trigger": None, "trigger_ref": None, "action": None, "action_ref": None, "enabled": True,
                "conditions": {}, "action_params": {}, "trigger_params": {}, "trace_tag_template": None,
                "is_adhoc": False, "created": SEED_STAMP, "updated": SEED_STAMP}
        rule.update(fields)
        pack = self.packs.get(rule["pack_ref"])
        rule["pack"] = pack["id"] if pack else None
        return rule

    @route("GET", r"/api/v1/rules", query="page page_size q pack_ref action_ref trigger_ref enabled")
    def rules_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rules = [r for r in sorted(self.rules.values(), key=lambda r: r["id"])
                 if all(not q.get(k) or r.get(k) == q[k] for k in ("pack_ref", "action_ref", "trigger_ref"))
                 and (q.get("enabled") is None or str(r["enabled"]).lower() == q["enabled"])]
        return self.paginate(req, rules)

    @route("GET", r"/api/v1/rules/" + REF)
    def rules_show(self, req, ref):
        rule, error = self.lookup(self.rules, ref, "Rule")
        return error or (200, envelope(rule))

    @route("POST", r"/api/v1/rules",
           body="ref pack_ref label description action_ref trigger_ref conditions action_params "
                "trigger_params sensor_worker_selector sensor_worker_tolerations sensor_worker_affinity "
                "trace_tag_template permission_set_refs enabled")
    def rules_create(self, req):
        body = req.json() or {}
        missing = [k for k in ("ref", "pack_ref", "label", "trigger_ref", "action_ref") if not body.get(k)]
        if missing:
            return api_error(422, "Validation failed: %s required" % ", ".join(missing), "VALIDATION_ERROR")
        if body["ref"] in self.rules:
            return api_error(409, "Rule with ref '%s' already exists" % body["ref"], "CONFLICT")
        for collection, field, label in ((self.packs, "pack_ref", "Pack"), (self.triggers, "trigger_ref", "Trigger"),
                                         (self.actions, "action_ref", "Action")):
            if body[field] not in collection:
                return api_error(404, "%s '%s' not found" % (label, body[field]), "NOT_FOUND")
        rule = self.new_rule(self.new_id(), {k: v for k, v in body.items() if k in RULE_FIELDS})
        self.rules[rule["ref"]] = rule
        return 201, envelope(rule)

    @route("PUT", r"/api/v1/rules/" + REF,
           body="label description action_ref trigger_ref conditions action_params trigger_params "
                "sensor_worker_selector sensor_worker_tolerations sensor_worker_affinity "
                "trace_tag_template permission_set_refs enabled")
    def rules_update(self, req, ref):
        rule, error = self.lookup(self.rules, ref, "Rule")
        if error:
            return error
        rule.update({k: v for k, v in (req.json() or {}).items() if k in RULE_FIELDS and k != "ref"})
        rule["updated"] = self.stamp()
        return 200, envelope(rule, "Rule updated successfully")

    @route("POST", r"/api/v1/rules/%s/enable" % REF, body="")
    def rules_enable(self, req, ref):
        return self.toggled(self.rules, ref, "Rule", True)

    @route("POST", r"/api/v1/rules/%s/disable" % REF, body="")
    def rules_disable(self, req, ref):
        return self.toggled(self.rules, ref, "Rule", False)

    @route("DELETE", r"/api/v1/rules/" + REF)
    def rules_delete(self, req, ref):
        return self.removed(self.rules, ref, "Rule")


# === Fake server: triggers and sensors =======================================

class FakeTriggersAndSensors(FakeResources):
    """Triggers and sensors."""

    def seed_triggers_sensors(self):
        self.triggers, self.sensors, self.webhook_keys = {}, {}, set()
        self.sensor_logs = {("core.timer_sensor", "stdout"): "".join("tick %d\n" % n for n in range(1, 6))}
        for ref, label, webhook in (("core.timer", "Timer", None), ("core.webhook", "Webhook", "wh_test_key"),
                                    ("linux.file_watch", "File watch", None)):
            self.triggers[ref] = {
                "id": len(self.triggers) + 1, "ref": ref, "pack_ref": ref.split(".")[0], "label": label,
                "description": label + " trigger", "enabled": True, "webhook_enabled": webhook is not None,
                "webhook_key": webhook, "reference_visibility": "public", "reference_allowed_pack_refs": None,
                "param_schema": {"interval": {"type": "integer"}} if ref == "core.timer" else None,
                "out_schema": None, "is_adhoc": False, "created": SEED_STAMP, "updated": SEED_STAMP}
        for ref, trigger in (("core.timer_sensor", "core.timer"), ("linux.file_watch_sensor", "linux.file_watch")):
            self.sensors[ref] = {
                "id": len(self.sensors) + 1, "ref": ref, "pack_ref": ref.split(".")[0], "label": ref.split(".")[1],
                "description": "Fires %s" % trigger, "enabled": True, "entrypoint": "sensor.py",
                "runtime_ref": "core.python", "trigger_ref": trigger, "created": SEED_STAMP, "updated": SEED_STAMP}

    @route("GET", r"/api/v1/triggers", query="page page_size referencing_pack_ref")
    def triggers_list(self, req):
        return self.listed(req, self.triggers)

    @route("GET", r"/api/v1/packs/(?P<pack>[^/]+)/triggers", query="page page_size")
    def pack_triggers(self, req, pack):
        return self.listed(req, self.triggers, pack)

    @route("GET", r"/api/v1/triggers/" + REF, query="referencing_pack_ref")
    def triggers_show(self, req, ref):
        trigger, error = self.lookup(self.triggers, ref, "Trigger")
        return error or (200, envelope(trigger))

    @route("PUT", r"/api/v1/triggers/" + REF,
           body="label description enabled reference_visibility reference_allowed_pack_refs")
    def triggers_update(self, req, ref):
        trigger, error = self.lookup(self.triggers, ref, "Trigger")
        if error:
            return error
        body = req.json() or {}
        for field in ("label", "enabled", "reference_visibility", "reference_allowed_pack_refs"):
            if field in body:
                trigger[field] = body[field]
        if isinstance(body.get("description"), dict):
            trigger["description"] = body["description"].get("value")
        trigger["updated"] = self.stamp()
        return 200, envelope(trigger)

    @route("POST", r"/api/v1/triggers/%s/enable" % REF, body="")
    def triggers_enable(self, req, ref):
        return self.toggled(self.triggers, ref, "Trigger", True)

    @route("POST", r"/api/v1/triggers/%s/disable" % REF, body="")
    def triggers_disable(self, req, ref):
        return self.toggled(self.triggers, ref, "Trigger", False)

    @route("POST", r"/api/v1/triggers/%s/webhooks/(?P<verb>enable|disable|regenerate)" % REF, body="")
    def triggers_webhooks(self, req, ref, verb):
        """routes/webhooks.rs: the trigger in {data}; a new key when webhooks are enabled and on
        regenerate (400 while they are off); disable drops the key."""
        trigger, error = self.lookup(self.triggers, ref, "Trigger")
        if error:
            return error
        if verb == "regenerate" and not trigger["webhook_enabled"]:
            return api_error(400, "Webhooks are not enabled for this trigger. Enable webhooks first.", "BAD_REQUEST")
        if verb == "enable" and trigger["webhook_enabled"]:
            return 200, envelope(trigger)  # the key it has stays
        with self.lock:
            trigger.update(webhook_enabled=verb != "disable", updated=self.stamp(),
                           webhook_key=None if verb == "disable" else "wh_" + b64url(os.urandom(24)))
            if trigger["webhook_key"]:
                self.webhook_keys.add(trigger["webhook_key"])
        return 200, envelope(trigger)

    @route("DELETE", r"/api/v1/triggers/" + REF)
    def triggers_delete(self, req, ref):
        return self.removed(self.triggers, ref, "Trigger")

    @route("GET", r"/api/v1/sensors/%s/logs/(?P<stream>[^/]+)" % REF, query="tail")
    def sensors_log(self, req, ref, stream):
        """routes/sensor_logs.rs: text/plain, the whole log or its last `tail` lines; no offset."""
        if stream not in ("stdout", "stderr"):
            return api_error(422, "stream must be 'stdout' or 'stderr'", "VALIDATION_ERROR")
        _, error = self.lookup(self.sensors, ref, "Sensor")
        if error:
            return error
        text = self.sensor_logs.get((ref, stream))
        if text is None:
            return api_error(404, "Sensor log not found", "NOT_FOUND")
        tail = int(req.query.get("tail", ["0"])[0] or 0)
        if tail > 0:
            lines = text.splitlines()[-tail:]
            text = "\n".join(lines) + ("\n" if lines else "")
        return 200, Download(text.encode("utf-8"), "text/plain; charset=utf-8", "inline")

    @route("GET", r"/api/v1/sensors", query="page page_size")
    def sensors_list(self, req):
        return self.listed(req, self.sensors)

    @route("GET", r"/api/v1/packs/(?P<pack>[^/]+)/sensors", query="page page_size")
    def pack_sensors(self, req, pack):
        return self.listed(req, self.sensors, pack)

    @route("GET", r"/api/v1/sensors/" + REF)
    def sensors_show(self, req, ref):
        sensor, error = self.lookup(self.sensors, ref, "Sensor")
        return error or (200, envelope(sensor))

    @route("POST", r"/api/v1/sensors/%s/enable" % REF, body="")
    def sensors_enable(self, req, ref):
        return self.toggled(self.sensors, ref, "Sensor", True)

    @route("POST", r"/api/v1/sensors/%s/disable" % REF, body="")
    def sensors_disable(self, req, ref):
        return self.toggled(self.sensors, ref, "Sensor", False)


# === Fake server: keys =======================================================

class FakeKeys(FakeResources):
    """Keys: an encrypted value is null unless ?decrypt=true."""

    def seed_keys(self):
        self.keys = {}
        for ref, name, value, encrypted, owner_type, extra in (
                ("region", "Region", "eu-west-1", False, "system", {}),
                ("db_credentials", "Database", {"user": "svc", "pass": "hunter2"}, True, "system", {}),
                ("linux_token", "Linux token", "tok-linux", True, "pack",
                 {"owner": "2", "owner_pack": 2, "owner_pack_ref": "linux"})):
            self.keys[ref] = dict({"id": len(self.keys) + 1, "ref": ref, "name": name, "value": value,
                                   "encrypted": encrypted, "owner_type": owner_type, "owner": None,
                                   "created": SEED_STAMP, "updated": SEED_STAMP}, **extra)

    def key_view(self, key, decrypt=False):
        view = dict(key)
        if key["encrypted"] and not decrypt:
            view["value"] = None
        return view

    @route("GET", r"/api/v1/keys", query="owner_type owner page per_page")
    def keys_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        keys = [{k: key.get(k) for k in ("id", "ref", "owner_type", "owner", "name", "encrypted", "created")}
                for key in sorted(self.keys.values(), key=lambda key: key["id"])
                if all(not q.get(k) or key.get(k) == q[k] for k in ("owner_type", "owner"))]
        return self.paginate(req, keys, "per_page")

    @route("GET", r"/api/v1/keys/" + REF, query="decrypt")
    def keys_show(self, req, ref):
        key, error = self.lookup(self.keys, ref, "Key")
        return error or (200, envelope(self.key_view(key, req.query.get("decrypt") == ["true"])))

    @route("POST", r"/api/v1/keys",
           body="ref local_ref owner_type owner owner_identity owner_pack owner_pack_ref owner_action "
                "owner_action_ref owner_sensor owner_sensor_ref name value encrypted")
    def keys_create(self, req):
        body = req.json() or {}
        if "local_ref" in body:  # the newer body: the server builds the ref from the owner
            owner = {"system": None, "identity": body.get("owner_identity_login"),
                     "pack": body.get("owner_pack_ref"), "action": body.get("owner_action_ref"),
                     "sensor": body.get("owner_sensor_ref")}.get(body.get("owner_type"))
            body["ref"] = ".".join(p for p in (body.get("owner_type"), owner, body["local_ref"]) if p)
            body["owner"] = owner
        missing = [k for k in ("ref", "name", "owner_type") if not body.get(k)] + (
            ["value"] if "value" not in body else [])
        if missing:
            return api_error(422, "Validation failed: %s required" % ", ".join(missing), "VALIDATION_ERROR")
        if body["ref"] in self.keys:
            return api_error(409, "Key with ref '%s' already exists" % body["ref"], "CONFLICT")
        stamp = self.stamp()
        key = {"id": self.new_id(), "ref": body["ref"], "name": body["name"], "value": body["value"],
               "encrypted": bool(body.get("encrypted")), "owner_type": body["owner_type"],
               "owner": body.get("owner"), "created": stamp, "updated": stamp}
        self.keys[key["ref"]] = key
        return 201, envelope(self.key_view(key))

    @route("PUT", r"/api/v1/keys/" + REF, body="name value encrypted")
    def keys_update(self, req, ref):
        key, error = self.lookup(self.keys, ref, "Key")
        if error:
            return error
        key.update({k: v for k, v in (req.json() or {}).items() if k in ("name", "value", "encrypted")})
        key["updated"] = self.stamp()
        return 200, envelope(self.key_view(key), "Key updated successfully")

    @route("DELETE", r"/api/v1/keys/" + REF)
    def keys_delete(self, req, ref):
        return self.removed(self.keys, ref, "Key")


# === Fake server: workflows ==================================================

class FakeWorkflows(FakeResources):
    """Workflows and their files."""

    def seed_workflows(self):
        self.workflows = {}
        self.workflows["examples.deploy"] = {
            "id": 7, "ref": "examples.deploy", "pack": 3, "pack_ref": "examples", "label": "Deploy",
            "description": "Build, test and notify", "version": "1.2.0", "tags": ["ci", "deploy"],
            "param_schema": {"env": {"type": "string", "default": "staging"}}, "out_schema": None,
            "definition": {"version": "1.2.0", "tasks": [
                {"name": "build", "action": "core.echo",
                 "next": [{"when": "{{ succeeded() }}", "do": ["test", "lint"]}]},
                {"name": "test", "action": "core.echo", "next": [{"do": ["notify"]}]},
                {"name": "lint", "action": "core.echo", "next": [{"do": ["notify"]}]},
                {"name": "notify", "action": "core.echo"}]},
            "created": SEED_STAMP, "updated": SEED_STAMP}

    @route("GET", r"/api/v1/workflows", query="page page_size tags search pack_ref")
    def workflows_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        tags = set(t for t in q.get("tags", "").split(",") if t)
        search = q.get("search", "").lower()
        found = [{k: w[k] for k in ("id", "ref", "pack_ref", "label", "description", "version", "tags",
                                    "created", "updated")}
                 for w in sorted(self.workflows.values(), key=lambda w: w["id"])
                 if (not q.get("pack_ref") or w["pack_ref"] == q["pack_ref"]) and tags <= set(w["tags"])
                 and search in (w["label"] + " " + (w["description"] or "")).lower()]
        return self.paginate(req, found)

    @route("GET", r"/api/v1/workflows/" + REF)
    def workflows_show(self, req, ref):
        workflow, error = self.lookup(self.workflows, ref, "Workflow")
        return error or (200, envelope(workflow))

    @route("DELETE", r"/api/v1/workflows/" + REF)
    def workflows_delete(self, req, ref):
        return self.removed(self.workflows, ref, "Workflow")

    def workflow_file_saved(self, body, pack, existing=None):
        """The server's SaveWorkflowFileRequest checks, then the workflow as stored."""
        missing = [k for k in ("name", "label", "version", "pack_ref", "definition") if k not in body]
        if missing:
            return None, (422, "Failed to deserialize the JSON body into the target type: missing field `%s`"
                          % missing[0])
        if pack not in self.packs:
            return None, api_error(404, "Pack '%s' not found" % pack, "NOT_FOUND")
        stamp = self.stamp()
        workflow = dict(existing or {"id": self.new_id(), "created": stamp}, **{
            "ref": "%s.%s" % (pack, body["name"]), "pack": self.packs[pack]["id"], "pack_ref": pack,
            "label": body["label"], "description": body.get("description"), "version": body["version"],
            "param_schema": body.get("param_schema"), "out_schema": body.get("out_schema"),
            "definition": body["definition"], "tags": body.get("tags") or [], "updated": stamp})
        self.workflows[workflow["ref"]] = workflow
        return workflow, None

    @route("POST", r"/api/v1/packs/" + REF + "/workflow-files",
           body="name label version pack_ref definition description enabled param_schema out_schema tags "
                "reference_visibility reference_allowed_pack_refs")
    def workflow_files_create(self, req, ref):
        body = req.json() or {}
        if "%s.%s" % (ref, body.get("name")) in self.workflows:
            return api_error(409, "Workflow '%s.%s' already exists" % (ref, body.get("name")), "CONFLICT")
        workflow, error = self.workflow_file_saved(body, ref)
        return error or (201, envelope(workflow, "Workflow file saved successfully"))

    @route("PUT", r"/api/v1/workflows/" + REF + "/file",
           body="name label version pack_ref definition description enabled param_schema out_schema tags "
                "reference_visibility reference_allowed_pack_refs")
    def workflow_file_update(self, req, ref):
        existing, error = self.lookup(self.workflows, ref, "Workflow")
        if error:
            return error
        workflow, error = self.workflow_file_saved(req.json() or {}, existing["pack_ref"], existing)
        return error or (200, envelope(workflow, "Workflow file updated successfully"))


# === Fake server: workers and history ========================================

class FakeWorkers(FakeResources):
    """Workers (routes/workers.rs: the summary unwrapped, the list paginated, cordon wants a
    JSON body) and the history tables (routes/history.rs)."""

    def seed_workers(self, stamp):
        def worker(wid, name, role, age, health, active, most):
            return {"id": wid, "name": name, "worker_type": "local", "worker_role": role, "host": name,
                    "port": None, "status": "active" if health != "offline" else "inactive",
                    "last_heartbeat": stamp, "heartbeat_age_seconds": age, "heartbeat_stale": age > 90,
                    "cordoned": False, "cordon_reason": None, "cordoned_by": None, "cordoned_at": None,
                    "health_state": health, "supported_runtimes": [{"name": "python", "versions": ["3.11.9"]}],
                    "load": {"requested": 0, "scheduling": 0, "scheduled": 0, "running": active, "canceling": 0,
                             "total_active": active, "max_concurrent_executions": most,
                             "utilization_percent": active * 100 // most if most else None, "queue_depth": None,
                             "sensor_processes_running": None, "sensor_processes_monitored": None,
                             "active_rules": None, "max_concurrent_sensors": None},
                    "created": stamp, "updated": stamp}
        self.workers = {1: worker(1, "worker-build-01", "action", 12, "busy", 3, 10),
                        2: worker(2, "sensor-01", "sensor", 400, "offline", 0, None)}
        self.history = {("worker", 1): [{"time": stamp, "operation": "UPDATE", "entity_id": 1,
                                         "entity_ref": "worker-build-01", "changed_fields": ["status"],
                                         "old_values": {"status": "inactive"}, "new_values": {"status": "active"}}]}

    def a_worker(self, wid):
        found = self.workers.get(int(wid))
        return (found, None) if found else (None, api_error(404, "Worker with ID %s not found" % wid, "NOT_FOUND"))

    @route("GET", r"/api/v1/workers", query="q role status health_state cordoned page page_size")
    def workers_list(self, req):
        def wanted(w):
            q = req.query
            words = (q.get("q", [""])[0] or "").lower().split()
            text = " ".join(str(w[k]) for k in ("name", "host", "status", "worker_type", "worker_role")).lower()
            return all(word in text for word in words) and all(
                q.get(param, [None])[0] in (None, str(w[key]).lower())
                for param, key in (("role", "worker_role"), ("status", "status"), ("health_state", "health_state"),
                                   ("cordoned", "cordoned")))
        return self.paginate(req, [w for _, w in sorted(self.workers.items()) if wanted(w)])

    @route("GET", r"/api/v1/workers/(?P<wid>\d+)")
    def workers_show(self, req, wid):
        found, error = self.a_worker(wid)
        return error or (200, found)

    @route("POST", r"/api/v1/workers/(?P<wid>\d+)/(?P<verb>cordon|uncordon)", body="reason")
    def workers_cordon(self, req, wid, verb):
        if verb == "cordon" and "json" not in (req.headers.get("Content-Type") or ""):
            return 415, "Expected request with `Content-Type: application/json`"
        body = req.json() if req.body else None
        if verb == "cordon" and not isinstance(body, dict):
            return 400, "Failed to parse the request body as JSON"
        found, error = self.a_worker(wid)
        if error:
            return error
        reason = (body.get("reason") or "").strip() or None if verb == "cordon" else None
        found.update(cordoned=verb == "cordon", cordon_reason=reason, health_state="cordoned" if verb == "cordon"
                     else "busy", cordoned_by=int(req.claims["sub"]) if verb == "cordon" else None)
        return 200, found

    @route("GET", r"/api/v1/(?P<kind>workers|executions)/(?P<eid>\d+)/history", query="changed_field page page_size")
    def entity_history(self, req, kind, eid):
        field = req.query.get("changed_field", [None])[0]
        records = [r for r in self.history.get((kind[:-1], int(eid)), []) if field in (None, *r["changed_fields"])]
        return self.paginate(req, records)


# === Fake server: events and enforcements ====================================

class FakeEvents(FakeResources):
    """Events and enforcements (routes/events.rs: lists paginated with per_page, shows in {data})."""

    def seed_events(self, stamp):
        self.events = {501: {"id": 501, "trigger": 2, "trigger_ref": "core.webhook", "config": None,
                             "payload": {"path": "/hook", "body": {"disk": "full"}}, "source": 1,
                             "source_ref": "core.webhook_sensor", "rule": None, "rule_ref": None, "created": stamp},
                       502: {"id": 502, "trigger": 1, "trigger_ref": "core.timer", "config": None, "payload": None,
                             "source": 1, "source_ref": "core.timer_sensor", "rule": None, "rule_ref": None,
                             "created": stamp}}
        self.enforcements = {601: {"id": 601, "rule": 1, "rule_ref": "examples.on_hook",
                                   "trigger_ref": "core.webhook", "config": None, "event": 501, "status": "processed",
                                   "payload": {"disk": "full"}, "condition": "all", "conditions": [],
                                   "created": stamp, "resolved_at": stamp}}

    @route("GET", r"/api/v1/events", query="trigger trigger_ref source rule_ref include_total page per_page")
    def events_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [dict({k: e[k] for k in ("id", "trigger", "trigger_ref", "source", "source_ref", "rule", "rule_ref",
                                        "payload", "created")}, has_payload=e["payload"] is not None)
                for _, e in sorted(self.events.items(), reverse=True)
                if all(q.get(k) in (None, str(e[k])) for k in ("trigger_ref", "rule_ref", "source"))]
        return self.paginate(req, rows, "per_page", totals=q.get("include_total") == "true")

    @route("GET", r"/api/v1/events/(?P<eid>\d+)")
    def events_show(self, req, eid):
        found = self.events.get(int(eid))
        return (200, envelope(found)) if found else api_error(404, "Event with ID %s not found" % eid, "NOT_FOUND")

    @route("GET", r"/api/v1/enforcements", query="rule rule_ref event status trigger_ref include_total page per_page")
    def enforcements_list(self, req):
        q = {k: v[0] for k, v in req.query.items()}
        rows = [{k: e[k] for k in ("id", "rule", "rule_ref", "trigger_ref", "event", "status", "condition", "created")}
                for _, e in sorted(self.enforcements.items(), reverse=True)
                if all(q.get(k) in (None, str(e[k])) for k in ("event", "rule_ref", "trigger_ref", "status"))]
        return self.paginate(req, rows, "per_page", totals=q.get("include_total") == "true")

    @route("GET", r"/api/v1/enforcements/(?P<nid>\d+)")
    def enforcements_show(self, req, nid):
        found = self.enforcements.get(int(nid))
        return (200, envelope(found)) if found else api_error(404, "Enforcement with ID %s not found" % nid,
                                                              "NOT_FOUND")


# === Fake server: api and health =============================================

class FakeHealth(FakeResources):
    """The health check and the public server info."""

    @route("GET", r"/health")
    def health(self, req):
        return 200, {"status": "ok"}

    @route("GET", r"/api/v1/info", anonymous=True)
    def info(self, req):
        return 200, envelope({"version": self.build["version"], "git_sha": self.build["git_sha"]})


# === Fake server: the whole server ===========================================

class FakeAttune(FakeAuth, FakePacks, FakeActions, FakeExecutions, FakeInquiries, FakeArtifacts,
                 FakeIdentities, FakePermissions, FakeQueues, FakeCache, FakeAudit, FakePolicies, FakeRules,
                 FakeTriggersAndSensors, FakeKeys, FakeWorkflows, FakeWorkers, FakeEvents, FakeHealth):
    """A small Attune API on 127.0.0.1, threaded, with a request log, counters
    and fault injection.

    refresh_mode 'reusable' is what the real server does (an old refresh token
    stays valid); 'single-use' answers 401 to a refresh token used before, as a
    strict OAuth server would."""

    def __init__(self, access_ttl=3600, refresh_ttl=7 * 86400, refresh_mode="reusable",
                 clock_offset=0, tls=False, admin_password="s3cret-Admin-pw", leeway=60, prefix=""):
        self.access_ttl, self.refresh_ttl, self.leeway = access_ttl, refresh_ttl, leeway
        # prefix: the server behind a reverse proxy that routes https://gw/attune/... to it;
        # a request outside the prefix gets the gateway's 404 and is kept in gateway_misses
        self.prefix, self.gateway_misses = prefix, []
        self.expired_sent = []  # (path, seconds past exp) of every access token sent after its exp
        self.unauthorized = []  # paths answered 401
        self.contract_breaks = []  # requests with a query parameter or body key their route does not take
        self.refresh_mode, self.clock_offset, self.tls = refresh_mode, clock_offset, tls
        self.lock = threading.RLock()
        self.requests, self.faults, self.issued = [], [], []
        self.revoked, self.used_refresh = set(), set()
        self.received = set()  # every secret a client sent: passwords, tokens
        self.password_changes = []  # logins whose password /auth/change-password changed
        self.opaque = {}  # non-JWT access tokens the server accepts: token -> login
        self.nonce = 0
        self.users = {"admin": {"id": 1, "password": admin_password, "display_name": "Administrator"},
                      "zoe": {"id": 3, "password": "zoe-pass", "display_name": "Zoë Ørsted"}}
        self.ldap_users = {"ldapuser": {"id": 2, "password": "ldap-pass", "display_name": "LDAP User"}}
        self.integration_tokens = {"attune_it_testtoken": "admin"}
        # the OIDC device flow: what the provider will do, and the sealed sessions handed out
        self.device = {"enabled": True, "interval": 1, "expires_in": 600, "waits": 2, "outcome": "authorized",
                       "reasons": [], "login": "zoe", "enforce_interval": True, "start": {}}
        self.device_sessions, self.device_codes = {}, set()
        self.itoken_records = {}  # integration token -> its record
        # the notifier's WebSocket (/ws on the API's port): what it does, and each connection
        self.notifier = {"enabled": True, "welcome": True, "error": None, "silent": False, "close": None}
        self.ws_sessions = []  # {"token", "protocol", "filters", "messages", "sent", "closed"}
        self.stream_faults = []  # for /executions/stream: "drop", or a raw data line to send
        self.install_tests = None  # "succeeded", "failed" or "rolled_back": pack tests run after the answer
        self.build = {"version": "0.9.3", "git_sha": "3f2a9c1"}
        self.settings = {
            "authentication_enabled": True, "local_password_enabled": True,
            "local_password_visible_by_default": True, "oidc_enabled": False,
            "oidc_visible_by_default": False, "ldap_enabled": False, "ldap_visible_by_default": False,
            "self_registration_enabled": False}
        self.seed_resources()
        self.httpd = None
        self._tmp = None

    def seed_resources(self):
        """Every group's seed data, in the order that gives each item its id."""
        self.last_id = 100
        stamp = self.stamp()
        self.seed_identities(stamp)
        self.seed_workers(stamp)
        self.seed_events(stamp)
        self.seed_permissions(stamp)
        self.seed_work_queues(stamp)
        self.seed_cache(stamp)
        self.seed_policies(stamp)
        self.seed_audit()
        self.seed_artifacts()
        self.seed_inquiries()
        self.seed_packs()
        self.seed_actions()
        self.seed_executions()
        self.seed_triggers_sensors()
        self.seed_rules()
        self.seed_keys()
        self.seed_workflows()

    # -- control -------------------------------------------------------------
    def start(self, port=0):
        self.httpd = ThreadingServer(("127.0.0.1", port), FakeHandler)
        self.httpd.fake = self
        if self.tls:
            import ssl
            self._tmp = tempfile.mkdtemp(prefix="attune-fake-tls-")
            cert, key = os.path.join(self._tmp, "leaf.pem"), os.path.join(self._tmp, "leaf.key")
            with open(cert, "w") as f:
                f.write(TEST_LEAF_PEM)
            with open(key, "w") as f:
                f.write(TEST_LEAF_KEY)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def port(self):
        return self.httpd.server_address[1]

    @property
    def url(self):
        return "%s://127.0.0.1:%d%s" % ("https" if self.tls else "http", self.port, self.prefix)

    def now(self):
        return time.time() + self.clock_offset

    def fail(self, path, method=None, status=None, body=None, headers=None, delay=0.0,
             drop=False, truncate=False, times=1, effect=None, processed=False, dribble=None,
             endless=False, echo=None, slow_body=None):
        """Answer the next `times` requests for path (a string, or a compiled pattern the
        whole path must match) with a fault instead (None: all of them);
        effect() runs first (another client changing things at that very moment).
        processed: the request is handled first, its answer then replaced by the fault (a
        gateway failing after the server did the work); dribble: the answer goes out a byte
        every `dribble` seconds; endless: a chunked body that never ends (until 1 GiB); echo:
        body is echo(text), text being all the request sent (body and Authorization header);
        slow_body: the headers at once, then the body a byte every `slow_body` seconds."""
        with self.lock:
            self.faults.append(dict(path=path, method=method, status=status, body=body,
                                    headers=headers or {}, delay=delay, drop=drop,
                                    truncate=truncate, times=times, effect=effect, processed=processed,
                                    dribble=dribble, endless=endless, echo=echo, slow_body=slow_body))

    def take_fault(self, req):
        with self.lock:
            for fault in self.faults:
                path = fault["path"]  # a path, or a compiled pattern for a family of them
                if (path == req.path or (hasattr(path, "fullmatch") and path.fullmatch(req.path))) \
                        and fault["method"] in (None, req.method):
                    if fault["times"] is not None:
                        fault["times"] -= 1
                        if fault["times"] <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def count(self, method=None, path=None):
        with self.lock:
            return sum(1 for r in self.requests
                       if method in (None, r.method) and path in (None, r.path))

    def log(self):
        with self.lock:
            return ["%s %s" % (r.method, r.path) for r in self.requests]

    def secrets(self):
        """Every token and password this server handed out, knows or received: none may leak."""
        with self.lock:
            found = set(self.issued) | set(self.integration_tokens) | set(self.opaque) | self.device_codes
            found |= self.webhook_keys
            found |= {s for s in self.received if len(s) >= 8}
        for users in (self.users, self.ldap_users):
            found |= {u["password"] for u in users.values()}
        return found

    # -- tokens --------------------------------------------------------------
    def mint(self, login, token_type="access", ttl=None, iat=None, **extra):
        """A signed token; extra claims (execution_id for an execution token) go in as given."""
        with self.lock:
            user = self.users.get(login) or self.ldap_users.get(login) or next(
                (i for i in self.identities.values() if i["login"] == login), {"id": 99})
            iat = int(self.now()) if iat is None else int(iat)
            if ttl is None:
                ttl = self.access_ttl if token_type == "access" else self.refresh_ttl
            claims = {"sub": str(user["id"]), "login": login, "iat": iat, "exp": iat + ttl,
                      "token_type": token_type}
            claims.update(extra)
            if self.refresh_mode == "single-use":  # a strict server never repeats a token
                self.nonce += 1
                claims["nonce"] = self.nonce
            token = make_jwt(claims)
            self.issued.append(token)
            return token

    def token_body(self, login, with_user=True):
        data = {"access_token": self.mint(login, "access"), "refresh_token": self.mint(login, "refresh"),
                "token_type": "Bearer", "expires_in": self.access_ttl}
        if with_user:
            user = self.users.get(login) or self.ldap_users.get(login) or next(
                i for i in self.identities.values() if i["login"] == login)  # a service identity, no password
            data["user"] = {"id": user["id"], "login": login, "display_name": user["display_name"]}
        return 200, envelope(data)

    def bearer_claims(self, req):
        """(claims, None) or (None, message) for the request's access token."""
        if req.token is None:
            return None, "Missing authentication token"
        if req.token in self.opaque:
            return {"sub": "1", "login": self.opaque[req.token], "token_type": "access"}, None
        claims, problem = verify_jwt(req.token, self.now(), leeway=self.leeway)
        late, _ = verify_jwt(req.token, self.now(), leeway=10 ** 9)
        if late and late.get("exp", 0) < self.now():
            with self.lock:
                self.expired_sent.append((req.path, self.now() - late["exp"]))
        if problem == "expired":
            return None, "Authentication token expired"
        if problem or claims.get("token_type", "access") == "refresh" or req.token in self.revoked:
            return None, "Invalid authentication token"
        return claims, None

    # -- routes --------------------------------------------------------------
    def handle(self, req):
        """The answer of the handler whose route the request matches. Of the routes that match
        its path, one without parameters wins over one with, as in the server's router."""
        matches = [(route, match) for route in ROUTES for match in [re.match(route[1] + "$", req.path)] if match]
        if not matches:
            return api_error(404, "Not found", "NOT_FOUND")
        mine = sorted((m for m in matches if m[0][0] == req.method), key=lambda m: bool(m[1].groupdict()))
        if not mine:
            return api_error(405, "Method not allowed", "METHOD_NOT_ALLOWED")
        (_, _, name, anonymous, query, keys), match = mine[0]
        unknown = set(req.query) - query
        if keys is not None and "*" not in keys and req.body[:1] == b"{":
            try:
                unknown |= set(json.loads(req.body.decode("utf-8"))) - keys
            except ValueError:
                pass  # the handler says what is wrong with it
        if unknown and len(self.contract_breaks) < 100:  # bounded: the sandbox may serve for days
            with self.lock:
                self.contract_breaks.append("%s %s: %s" % (req.method, req.path, sorted(unknown)))
        if req.path.startswith("/api/v1/") and not anonymous:
            claims, problem = self.bearer_claims(req)
            if problem:  # the auth extractor's nested shape
                with self.lock:
                    self.unauthorized.append(req.path)
                return 401, {"error": {"code": 401, "message": problem}}
            req.claims = claims
        return getattr(self, name)(req, **{k: unquote(v) for k, v in match.groupdict().items()})





class WebSocketFrames:
    """The server side of RFC 6455 frames on a socket: masked frames in, plain frames out."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""

    def read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def receive(self):
        """(opcode, payload) of the next client frame; (None, None) at the end."""
        head = self.read(2)
        if head is None:
            return None, None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if not head[1] & 0x80:
            raise ValueError("a client frame without a mask")
        if length >= 126:
            length = int.from_bytes(self.read(2 if length == 126 else 8), "big")
        mask = self.read(4)
        data = self.read(length) if length else b""
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def send(self, opcode, payload):
        size = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([size]) if size < 126 else
                                          bytes([126]) + struct.pack(">H", size) if size < 65536 else
                                          bytes([127]) + struct.pack(">Q", size))
        self.sock.sendall(head + payload)

    def send_json(self, record, message):
        record["sent"].append(message)
        self.send(1, json.dumps(message).encode("utf-8"))


class ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True  # http.server.ThreadingHTTPServer is 3.7+
    allow_reuse_address = True
    # socketserver listens with a backlog of 5: 30 clients connecting at once (after a
    # shared refresh) would overflow it, and each dropped SYN costs its client a second
    request_queue_size = 128


class FakeHandler(http.server.BaseHTTPRequestHandler):
    server_version = "FakeAttune/1.0"

    def log_message(self, *args):
        pass

    date_override = None  # a fault's own Date header

    def date_time_string(self, timestamp=None):
        """The Date header follows the fake's clock, skew included (or a fault's Date)."""
        from email.utils import formatdate
        if self.date_override is not None:
            return self.date_override
        return formatdate(self.server.fake.now() if timestamp is None else timestamp, usegmt=True)

    def behind_the_gateway(self):
        """False (answered 404, as a gateway does) when the fake has a prefix and the request
        is outside it; otherwise True, self.path without the prefix."""
        fake = self.server.fake
        if not fake.prefix:
            return True
        if self.path.startswith(fake.prefix + "/"):
            self.path = self.path[len(fake.prefix):]
            return True
        with fake.lock:
            fake.gateway_misses.append((self.command, self.path))
        self.close_connection = True
        self.reply(404, "no route at the gateway", {"Content-Type": "text/plain"})
        return False

    def do_any(self):
        fake = self.server.fake
        if not self.behind_the_gateway():
            return
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        length = int(self.headers.get("Content-Length") or 0)
        req = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
        if self.received(req):
            return
        status, body = fake.handle(req)
        no_store = {"Cache-Control": "no-store"} if req.path.startswith("/auth/oidc/device/") or \
            req.path == "/api/v1/info" or (req.path == "/api/v1/inquiries" and req.method == "POST") else None
        self.reply(status, body, no_store)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_any

    def received(self, req):
        """Log the request; True when an injected fault answered it (or dropped it)."""
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(req)
            if req.token:
                fake.received.add(req.token)
        fault = fake.take_fault(req)
        if not fault:
            return False
        time.sleep(fault["delay"])
        if fault["effect"]:
            with fake.lock:
                fault["effect"]()
        if fault["processed"]:
            fake.handle(req)
        if fault["drop"]:
            self.close_connection = True
        elif fault["dribble"]:
            self.dribble(fault["status"] or 200, fault["body"], fault["headers"], fault["dribble"])
        elif fault["endless"]:
            self.endless(fault["status"] or 200)
        elif fault["slow_body"]:
            self.slow_body(fault["status"] or 200, fault["body"], fault["slow_body"])
        elif fault["echo"]:
            sent = "%s %s" % (req.body.decode("utf-8", "replace"), req.headers.get("Authorization"))
            self.reply(fault["status"] or 400, fault["echo"](sent), fault["headers"])
        elif fault["status"] is not None:
            self.reply(fault["status"], fault["body"], fault["headers"], fault["truncate"])
        else:
            return False  # only a delay
        return True

    def dribble(self, status, body, headers, delay):
        """The whole answer, status line to body, a byte at a time (a slow proxy or worse);
        over after the last byte or when the client has gone."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        head = "HTTP/1.1 %d %s\r\n" % (status, self.responses.get(status, ("?",))[0])
        head += "".join("%s: %s\r\n" % item for item in dict({"Content-Type": "application/json"},
                                                               **headers).items())
        raw = (head + "Content-Length: %d\r\n\r\n" % len(data)).encode("latin-1") + data
        self.close_connection = True
        for i in range(len(raw)):
            try:
                self.wfile.write(raw[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(delay)

    def slow_body(self, status, data, delay):
        """Headers at once, then the body a byte at a time (a large download, slowly)."""
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(delay)
        except OSError:
            pass

    def endless(self, status):
        """A chunked JSON-looking body that does not end: a client must stop reading it."""
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
            for _ in range((1 << 30) // 65536):
                self.wfile.write(chunk)
        except OSError:
            pass

    def reply(self, status, body, headers=None, truncate=False):
        if isinstance(body, EventStream):
            return self.stream(body)
        if isinstance(body, Download):
            headers = dict(headers or {}, **{"Content-Type": body.content_type,
                                             "Content-Disposition": body.disposition})
            body = body.content
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body).encode("utf-8")
        try:
            headers = dict(headers or {})
            self.date_override = headers.pop("Date", None)
            self.send_response(status)
            if data and not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data) + (1000 if truncate else 0)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if truncate:
            self.close_connection = True

    def websocket(self):
        """The notifier: a WebSocket upgrade of /ws (token from Authorization or an
        attune.jwt.<token> protocol), a welcome, subscriptions, and a notification each
        time a subscribed execution's status changes; close 4401 once the token expires."""
        fake = self.server.fake
        headers = dict(self.headers.items())
        protocols = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")]
        jwt_protocol = [p[len("attune.jwt."):] for p in protocols if p.startswith("attune.jwt.")]
        if jwt_protocol and "Authorization" not in headers:
            headers["Authorization"] = "Bearer " + jwt_protocol[0]
        req = Seen(self.command, self.path, headers, b"")
        self.close_connection = True
        if self.received(req):
            return
        if req.path != "/ws" or not fake.notifier["enabled"]:
            return self.reply(404, "Not Found", {"Content-Type": "text/plain"})
        claims, problem = fake.bearer_claims(req)
        if problem:
            return self.reply(401, {"error": "missing_token" if req.token is None else "invalid_or_expired_token"})
        accept = base64.b64encode(hashlib.sha1((headers.get("Sec-WebSocket-Key", "") +
                                                attune.WEBSOCKET_GUID).encode()).digest()).decode()
        self.send_response(101)
        for name, value in (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                            ("Sec-WebSocket-Accept", accept), ("Sec-WebSocket-Protocol", "attune.v1")):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        record = {"token": req.token, "protocol": headers.get("Sec-WebSocket-Protocol"), "filters": [],
                  "messages": [], "sent": [], "closed": None}
        with fake.lock:
            fake.ws_sessions.append(record)
        frames = WebSocketFrames(self.connection)
        try:
            if fake.notifier["welcome"]:
                frames.send_json(record, {"type": "welcome", "client_id": "client_%d" % len(fake.ws_sessions),
                                          "message": "Connected to Attune Notifier"})
            if fake.notifier["error"]:
                frames.send_json(record, {"type": "error", "message": fake.notifier["error"]})
            self.notify_loop(fake, frames, record, claims)
        except (OSError, ValueError):
            record["closed"] = record["closed"] or "dropped"

    def notify_loop(self, fake, frames, record, claims):
        import select
        known = {}  # execution id -> the status last announced
        while True:
            if select.select([self.connection], [], [], 0.05)[0]:
                opcode, payload = frames.receive()
                if opcode is None or opcode == 8:
                    record["closed"] = "client"
                    return frames.send(8, payload or b"")
                if opcode == 1:
                    message = json.loads(payload.decode("utf-8"))
                    record["messages"].append(message)
                    if message.get("type") == "subscribe":
                        record["filters"].append(message["filter"])
                        kind, _, eid = message["filter"].rpartition(":")
                        if kind == "entity:execution" and int(eid) in fake.executions:
                            known[int(eid)] = fake.executions[int(eid)]["status"]
                        if fake.notifier["close"]:
                            code, reason = fake.notifier["close"]
                            record["closed"] = str(code)
                            return frames.send(8, struct.pack(">H", code) + reason.encode())
            if claims.get("exp", float("inf")) < fake.now():
                record["closed"] = "4401"
                return frames.send(8, struct.pack(">H", 4401) + b"token expired")
            for eid in list(known):
                fake.advance(eid)
                with fake.lock:
                    execution = dict(fake.executions[eid])
                if execution["status"] != known[eid] and not fake.notifier["silent"]:
                    payload = {k: execution.get(k) for k in EXECUTION_SUMMARY_FIELDS + ("action", "started_at")}
                    payload.update(entity_type="execution", entity_id=eid, action_id=execution["action"],
                                   old_status=known[eid])
                    payload.pop("result", None)
                    frames.send_json(record, {"type": "notification", "notification_type": "execution_status_changed",
                                              "entity_type": "execution", "entity_id": eid, "user_id": None,
                                              "payload": payload, "timestamp": fake.stamp()})
                known[eid] = execution["status"]

    def stream(self, events):
        """Server-sent events, flushed one by one; the body ends when the connection closes."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for chunk in events.chunks:
                self.wfile.write(chunk.encode("utf-8"))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


# Test PKI for the TLS tests: a CA and a leaf for 127.0.0.1/localhost, valid 2020-2120.
TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIC+DCCAeCgAwIBAgICEAAwDQYJKoZIhvcNAQELBQAwHDEaMBgGA1UEAwwRYXR0
dW5lLnB5IHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBa
MBwxGjAYBgNVBAMMEWF0dHVuZS5weSB0ZXN0IENBMIIBIjANBgkqhkiG9w0BAQEF
AAOCAQ8AMIIBCgKCAQEAwCaQI8Rw3u6bzk37fy2cUbBIYNcIFu68ius5DBXbunUG
kVqE0NA8GU3s4IWr3S2V0NT6FfPq1OT6Q/tjNGNik3YJQv9DHrcUE9f9JAQilfpd
uwJT2aZC3xnkQTItcxsrkEw9PSxIP85K3/tlwbonle2GpbaYx6IRTEJsk9nElYBN
+Yx9+eyIUsAOykLJA0JicowpetzPsdqx3NVocQBZgDO0KKq/iWhg/+Pf6U9O7Lm+
vxI4DKP8d773/1bBWAUAJNOwiQ/WbSDy8gFC/OLpQ8LNiN88jaVV0TB/cKu6P++M
wP0kZq2aRB4SxWPV7zIdzbtvRGzUZR5Tg5s203xmTQIDAQABo0IwQDAPBgNVHRMB
Af8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUmQW8/TgJfkXp47sW
uZ9dTdZmzYkwDQYJKoZIhvcNAQELBQADggEBAIM9fSjTSYCmJN2gIXQf4b2Es8v8
z8uFaPRLcBpgKlWp35jJCnX1IEBssCPszI5R7+0hCSpUAf+PkB/fHXBsiyNqY4DV
pVCtgjH1DhD4GEOAGWZtWjA1DiiENf/26PS38teidYlfD5Wdf7q6WUgAxVFAtZY+
U4Dlmbv/b/3vKxt8BVfhxwIkdwkzodJV7cCQeQacLsSZN8FdwArMmVq7wiili1JB
XVcDA4cFNqwPj2fRkwsWefH2YJBs1h7pRpn4U+jiBILRrhxwl/KnPzEw9YQSW8h7
ehrayOT7DtFmEcAt/nvCs6QozOgiMVSl7Hgib0o+Ui2bSnZi8EwJzv77oXI=
-----END CERTIFICATE-----
"""
TEST_LEAF_PEM = """-----BEGIN CERTIFICATE-----
MIIDQTCCAimgAwIBAgICEAEwDQYJKoZIhvcNAQELBQAwHDEaMBgGA1UEAwwRYXR0
dW5lLnB5IHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBa
MBQxEjAQBgNVBAMMCTEyNy4wLjAuMTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCC
AQoCggEBAKxs5X50s4APJ5jpCjPtlMtyPtrMYg2Jut7cJRYnq/hO6z8tOcQTrEaD
6ddWBXeBv7DmqId6xmxpxJepMx/lgnTR0ZeowOIqXuUMihvMVmJWRq4ylR/jtU6B
6q08gxt36I1DvFCfy96PDRCVBuuxj6FWcsFuo1oXL/0HTXzMxV/UF47Kt3Lj+IqK
IdquLP86tQTQKICM6Yr6TzkxpstVEda3LcVtdNgaTbtk5VY3zmJumltRdbbYKeoT
r84Dhmld3hlKPxOxdbWoNAjqc/Qp0zSFZUbcith7gtcqm5QXYW9qlcOQ2BXKa5b+
myRmRWkVLo9bddokybtJxfJdk5BGCZ0CAwEAAaOBkjCBjzAMBgNVHRMBAf8EAjAA
MA4GA1UdDwEB/wQEAwIFoDATBgNVHSUEDDAKBggrBgEFBQcDATAaBgNVHREEEzAR
hwR/AAABgglsb2NhbGhvc3QwHQYDVR0OBBYEFJRcPPHDKS33mchhekVYR08+XkFM
MB8GA1UdIwQYMBaAFJkFvP04CX5F6eO7FrmfXU3WZs2JMA0GCSqGSIb3DQEBCwUA
A4IBAQC0U05TsxKeV4yZzNQ/HV8c+ndTkNnPEnwyGFt9bOAogcablZ/2Y3RvUP58
deVRYnWo2sCBesJK+P14jncTqUZoDpZJOKuNnJjrdM2PN7PI77c2h/eGpzbWAxGN
LMuVt3LZOYizf4xidHSaRvYgmTsUuXAE8H18l13zkUVY9T5u3sTszsSshbnsyVnv
bgSbluSl8G5umaEdb2xSd4KMgDx0eJT6fzF2KTefBOBYGft45x4iG+DUjLkvSWjT
Ti+K4q4SpvFt0LgtiJQQk+iWizKcKUZZUe4/0Q1J+du5xlEjU0ltweFp42kDfIEK
K9d5MGGe5nEwOFws7txRONQNUulq
-----END CERTIFICATE-----
"""
TEST_LEAF_KEY = """-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCsbOV+dLOADyeY
6Qoz7ZTLcj7azGINibre3CUWJ6v4Tus/LTnEE6xGg+nXVgV3gb+w5qiHesZsacSX
qTMf5YJ00dGXqMDiKl7lDIobzFZiVkauMpUf47VOgeqtPIMbd+iNQ7xQn8vejw0Q
lQbrsY+hVnLBbqNaFy/9B018zMVf1BeOyrdy4/iKiiHariz/OrUE0CiAjOmK+k85
MabLVRHWty3FbXTYGk27ZOVWN85ibppbUXW22CnqE6/OA4ZpXd4ZSj8TsXW1qDQI
6nP0KdM0hWVG3IrYe4LXKpuUF2FvapXDkNgVymuW/pskZkVpFS6PW3XaJMm7ScXy
XZOQRgmdAgMBAAECggEAGrIo3WmD1IBu1jcX5s6nz9CqQvsLoA1NMFhvqjH4khM5
9gfyXoAt7KRbjgUEsf+V5nWX7eidlHHTHSjLwGpVm/D+cpePTD+uKJLGm/jeU7my
63aWbcpg1b0PUMTChya2C+UgYMU/mH+X0L5ExN+IHZKCZZ4pJCIx7Qr2ktYrevix
y3OLT9cV3/5DQd2K7ae87sClWJ0tOMWb5cFZ+qh0ucMqJ5jedksfjC+0UzITwftc
tdfnhveFTT2za5RS00NTkRm8hVqhRs34WHfcm4Zv9dKlW9Vm8/W3L33Sh4sMrEz9
5Yc5OkeT2KhH3Vws6oLOmEEtoNv+hbJyCci3b51yewKBgQDt5KaaDgrstOPodylr
769D8Bog4uxMKfBZqGF/FhyRZE4deFqqUkDlR6y44cADn6XOxNctfsIAZxOKfunz
a1k89Q+ltdj+gm8isTySqqP9yoJv8ZRELxC7XnCwN0USdx3D9jsDRKOxpoystSpR
/bTTPmoMOYcczDBSC200yN8oVwKBgQC5jJsE7JgC+zENRYrhuDZuyQZOw9DiDiBT
PgDiX2ZcAGR3MF/LXSstQXXD1sXrs2VAXsSXMNlDjOhFM1H6LLoNDvyDt6RiZD3t
1nGtHHQJ7VMPz+MbUib6wg5D83x1oSt9k7MV/B4u1Zw3LiudvUlyE20u7PuP1dU1
lE9Zhun1KwKBgQCqC+1C5ZLNjKf0vWjwbI39pB0pMMvzzW6ux/uZGjclfmuQCT3V
zaHxwoAmT8gvTuj4mh+tt5P5MbT4JKwagbtyJUIgE5KeqqHCTKqdtDgw65a9ahOv
gW0WYfVvILLQ9jBiqRmZxnC0Rfb8ZStxHEcrUMwBHQYFgbdwjhZrysIpVQKBgQCC
z4C+cPoeJ+8F90AZL+CYK/rZbq2FoQXjCbRf43frZo9tg9oVKiL1bc/TeEfiin/Y
aLdaC6MwP1fE6ZBiukOUTztwtPgcMaWDVoqfy453LSxA2oO20C0Q3dxmxXK6Dxz1
FDrORgcVZ50RPeib9UWhOdbgnUwgtFTyyBNE/5tTLwKBgHY5cvA27DRZ84b7jGTV
zV9UbZk8Uef2s0M8J0LIf61n9gdhRPRN4Pbzi5GrknMKMR2nQZfJJlA5H43eq46O
J+wilgPptstpXC9JRHWVWKvGXttalDfz9+oV+nL87nGUcd2BSn5zkSHhdUk71n5Z
MU7GjYNLqOvejHTCpFzMvno4
-----END PRIVATE KEY-----
"""


# === Test helpers ============================================================

def many_profiles(count):
    """count profiles as a fleet has them (one per customer or CI runner), none logged in."""
    return {"customer-%05d" % i: {"api_url": "https://attune-%05d.customers.example.com" % i,
                                  "username": "ci-runner-%d" % i, "auth_method": "direct",
                                  "description": "customer %d production runner pool" % i,
                                  "ca_bundle": "/etc/ssl/certs/customer-%05d.pem" % i} for i in range(count)}


def read_terminal(master):
    """Everything written to a pseudo-terminal until its last writer closes it; closes master."""
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out


def slow(test):
    """Marks a test (or class) that `make check`, the everyday quick run, leaves out."""
    test.slow = True
    return test


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "Result(code=%r, out=%r, err=%r)" % (self.code, self.out[-2000:], self.err[-2000:])


class FakeMsvcrt:
    """Behaves like msvcrt.locking for the Windows lock path: a non-blocking lock of
    nbytes at the fd's current position, refused while another fd holds it."""
    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4

    def __init__(self):
        self.held = {}
        self.calls = []

    def locking(self, fd, mode, nbytes):
        st = os.fstat(fd)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        key = (st.st_dev, st.st_ino, offset, nbytes)
        self.calls.append((mode, offset, nbytes))
        if mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise PermissionError(errno.EACCES, "Permission denied")
            del self.held[key]
        elif mode == self.LK_NBLCK:
            if key in self.held:
                raise PermissionError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        else:
            raise ValueError("mode %r not used by attune.py" % mode)


class AttuneTestCase(unittest.TestCase):
    """A temporary home, a credential file path inside it, and a fake server."""
    server_options = {}

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="attune-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.server = FakeAttune(**self.server_options).start()
        self.addCleanup(self.server.stop)
        self.addCleanup(self.keeps_to_the_contract, self.server)
        self.config = os.path.join(self.tmp, "home", ".config", "attune", "credentials.json")
        self.env = {"HOME": os.path.join(self.tmp, "home"), "ATTUNE_CONFIG": self.config}

    def keeps_to_the_contract(self, server):
        """Every request the test made sends only the query parameters and body keys its route
        takes. A test of what the user writes (`attune api`) empties contract_breaks itself."""
        self.assertEqual(server.contract_breaks, [], "query parameters or body keys the server's routes do not take")

    # -- running attune ------------------------------------------------------
    def run_cli(self, *argv, env=None, stdin="", clock=None, secrets_ok=False):
        """attune.main(argv) in process; stdout and stderr captured and scanned for secrets."""
        environ = self.environ(env)
        out, err = io.StringIO(), io.StringIO()
        old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = attune.main(list(argv), environ=environ, clock=clock)
                except SystemExit as e:  # argparse
                    code = e.code
        finally:
            sys.stdin = old_stdin
        result = Result(code, out.getvalue(), err.getvalue())
        self.assert_no_leak(result, secrets_ok)
        return result

    def environ(self, extra=None):
        environ = dict(self.env)
        for key, value in (extra or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return environ

    def process_env(self, extra=None):
        environ = self.environ(extra)
        environ.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
        environ.setdefault("PYTHONIOENCODING", "utf-8")
        return child_env(environ)

    def spawn(self, *argv, env=None, stdin=subprocess.DEVNULL, script=False, **kwargs):
        return subprocess.Popen(attune_argv(script) + list(argv), env=self.process_env(env),
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, **kwargs)

    def run_process(self, *argv, env=None, input=None, timeout=60, secrets_ok=False, script=False):
        p = self.spawn(*argv, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                       script=script)
        out, err = p.communicate(input, timeout=timeout)
        result = Result(p.returncode, out, err)
        self.assert_no_leak(result, secrets_ok)
        return result

    def assert_no_leak(self, result, stdout_ok=False):
        for secret in self.server.secrets() | getattr(self, "extra_secrets", set()):
            if not stdout_ok:
                self.assertNotIn(secret, result.out, "a secret leaked to stdout")
            self.assertNotIn(secret, result.err, "a secret leaked to stderr")

    def ok(self, *argv, **kwargs):
        result = self.run_cli(*argv, **kwargs)
        self.assertEqual(result.code, 0, result)
        return result

    def fails(self, code, *argv, **kwargs):
        result = self.run_cli(*argv, **kwargs)
        self.assertEqual(result.code, code, result)
        self.assertNotIn("Traceback", result.err)
        if result.err:  # errors have one format; `auth status` reports on stdout instead
            self.assertTrue(result.err.startswith("attune: "), result)
        return result

    def wait_until(self, condition, seconds=10):
        """Wait for an event another thread or process brings about (never for a fixed time)."""
        deadline = time.monotonic() + seconds
        while not condition():
            self.assertLess(time.monotonic(), deadline, "gave up waiting")
            time.sleep(0.02)

    # -- the credential file -------------------------------------------------
    def read_doc(self):
        with open(self.config, encoding="utf-8") as f:
            return json.load(f)

    def write_doc(self, doc, mode=0o600):
        os.makedirs(os.path.dirname(self.config), mode=0o700, exist_ok=True)
        with open(self.config, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.chmod(self.config, mode)

    def profile(self, name="default"):
        return self.read_doc()["profiles"][name]

    def seed(self, profile="default", access_left=3000, access_ttl=3600, refresh_left=6 * 86400,
             refresh_ttl=7 * 86400, store_expiry=True, current=True, user="admin", **fields):
        """Store a logged-in profile whose tokens come from the fake server."""
        now = int(time.time())
        access = self.server.mint(user, "access", ttl=access_ttl, iat=now + access_left - access_ttl)
        refresh = self.server.mint(user, "refresh", ttl=refresh_ttl, iat=now + refresh_left - refresh_ttl)
        entry = {"api_url": self.server.url, "auth_token": access, "refresh_token": refresh,
                 "username": user, "auth_method": "password", "invalidated_at": None}
        if store_expiry:
            entry["auth_token_expires_at"] = now + access_left
            entry["refresh_token_expires_at"] = now + refresh_left
        entry.update(fields)
        doc = self.read_doc() if os.path.exists(self.config) else {"version": 1, "profiles": {}}
        doc["profiles"][profile] = entry
        if current:
            doc["current_profile"] = profile
        self.write_doc(doc)
        return entry

    def wait_for_writes(self, writers, deadline=60):
        """Wait until each writer's pid shows in the credential file: proof that it wrote."""
        pids, seen = {p.pid for p in writers}, set()
        end = time.monotonic() + deadline
        while seen != pids and time.monotonic() < end:
            doc = self.read_doc()  # atomic renames: never a torn file
            seen |= {entry.get("pid") for entry in doc["profiles"].values() if isinstance(entry, dict)} & pids
            time.sleep(0.005)
        self.assertEqual(seen, pids, "some writers never wrote")

    def snapshot(self):
        with open(self.config, "rb") as f:
            return f.read(), os.stat(self.config).st_mtime_ns


# === Tests: small pieces =====================================================

class JwtTests(unittest.TestCase):
    def test_claims_of_a_real_token(self):
        token = make_jwt({"sub": "1", "login": "admin", "iat": 1000, "exp": 4600})
        self.assertEqual(attune.jwt_claims(token)["login"], "admin")
        self.assertEqual(attune.jwt_expiry(token), 4600)
        self.assertEqual(attune.jwt_lifetime(token), 3600)

    def test_padding_is_restored(self):
        for n in range(1, 8):  # payload lengths that need 0, 1 and 2 padding characters
            token = make_jwt({"exp": 10 ** n, "x": "a" * n})
            self.assertEqual(attune.jwt_expiry(token), 10 ** n)

    def test_malformed_tokens_have_unknown_expiry(self):
        def token(payload):
            return "eyJhbGciOiJIUzI1NiJ9." + payload + ".sig"

        cases = {
            "two parts": "abc.def",
            "four parts": "a.b.c.d",
            "not base64": token("!!!***"),
            "not json": token(b64url(b"not json at all")),
            "not utf-8": token(b64url(b"\xff\xfe\xfd")),
            "array payload": token(b64url(b"[1, 2]")),
            "no exp": token(b64url(b'{"iat": 1}')),
            "exp as string": token(b64url(b'{"exp": "1700000000", "iat": 1}')),
            "exp as bool": token(b64url(b'{"exp": true}')),
            "exp NaN": token(b64url(b'{"exp": NaN}')),
            "deeply nested": token(b64url(b"[" * 100000 + b"]" * 100000)),
            "100 KB": token(b64url(json.dumps({"exp": "x", "pad": "y" * 100000}).encode())),
            "empty": "",
            "not a string": None,
        }
        for name, value in cases.items():
            with self.subTest(name):
                self.assertIsNone(attune.jwt_expiry(value))
                self.assertIsNone(attune.jwt_lifetime(value))

    def test_margin_is_ten_percent_clamped(self):
        self.assertEqual(attune.refresh_margin(3600), 300)
        self.assertEqual(attune.refresh_margin(1200), 120)
        self.assertEqual(attune.refresh_margin(100), 30)
        self.assertEqual(attune.refresh_margin(86400), 300)
        self.assertEqual(attune.refresh_margin(None), 30)
        self.assertEqual(attune.refresh_margin(60), 30)
        self.assertEqual(attune.refresh_margin(35), 17)  # at most half the lifetime
        self.assertEqual(attune.refresh_margin(20), 10)
        self.assertEqual(attune.refresh_margin(1), 1)

    def test_durations(self):
        self.assertEqual(attune.format_duration(0), "0s")
        self.assertEqual(attune.format_duration(45), "45s")
        self.assertEqual(attune.format_duration(60), "1m")
        self.assertEqual(attune.format_duration(3552), "59m 12s")
        self.assertEqual(attune.format_duration(3600), "1h")
        self.assertEqual(attune.format_duration(3725), "1h 2m")
        self.assertEqual(attune.format_duration(7 * 86400 - 3600), "6d 23h")
        self.assertEqual(attune.format_duration(-90), "-1m 30s")


class YamlTests(unittest.TestCase):
    def test_block_style(self):
        data = [{"id": 1, "ref": "core", "tags": ["a", "b"], "meta": {"x": None, "z": True},
                 "empty": [], "none": {}}]
        self.assertEqual(attune.to_yaml(data), "\n".join([
            "- id: 1", "  ref: core", "  tags:", "  - a", "  - b", "  meta:", "    x: null",
            "    z: true", "  empty: []", "  none: {}"]))

    def test_nested_lists(self):
        self.assertEqual(attune.to_yaml([[1, 2], []]), "- - 1\n  - 2\n- []")
        self.assertEqual(attune.to_yaml({"a": [{"b": 1, "c": [2]}]}), "a:\n- b: 1\n  c:\n  - 2")

    def test_strings_are_quoted_when_yaml_would_misread_them(self):
        quoted = ["", " lead", "trail ", "yes", "No", "on", "null", "~", "true", "123", "1.5", "0x1f",
                  "-1", "+1", ".5", ".inf", "1e3", "2026-11-24", "12:30", "- item", "a: b", "key:",
                  "# comment", "x #y", "*anchor", "&a", "!tag", "|", ">", "'q'", '"q"', "%x", "@x",
                  "`x`", "{a}", "[a]", "line\nbreak", "tab\there", "bell\x07", "?", "y", "N"]
        for text in quoted:
            with self.subTest(text=text):
                rendered = attune.to_yaml({"k": text})
                self.assertEqual(rendered, "k: " + json.dumps(text, ensure_ascii=False))
        for text in ["plain", "core.http", "Hello world", "a-b", "a:b", "C:/x", "ünïcode", "x#y"]:
            with self.subTest(text=text):
                self.assertEqual(attune.to_yaml({"k": text}), "k: " + text)

    def test_keys_and_scalars(self):
        self.assertEqual(attune.to_yaml({"yes": 1, "a b": 2.5, "m": None, "f": False}),
                         '"yes": 1\na b: 2.5\nm: null\nf: false')
        self.assertEqual(attune.to_yaml("x"), "x")
        self.assertEqual(attune.to_yaml([]), "[]")

    def test_ascii_only_escapes_non_ascii(self):
        self.assertEqual(attune.to_yaml({"name": "Zoë"}, ascii_only=True), 'name: "Zo\\u00eb"')


class TableTests(unittest.TestCase):
    def test_a_count_and_its_noun(self):
        for n, noun, text in ((1, "executions", "1 execution"), (2, "executions", "2 executions"),
                              (1, "inquiries", "1 inquiry"), (0, "entries", "0 entries"), (1, "items", "1 item")):
            self.assertEqual(attune.counted(n, noun), text)

    def test_a_table_written_as_data(self):
        """cell(), labelled(), cells() and table_of() read tables written as strings: '?'
        shows an empty value as '-', '@' a timestamp, '@?' both, '~N' cuts the text; each code
        against the function it stands for, on every kind of value a server sends."""
        values = [None, "", "x", 0, False, True, 1.5, [], {}, "2026-11-24T12:00:00.123Z", "a" * 60, "\x1b[2J"]
        for value in values:
            item = {"k": value}
            with self.subTest(value=value):
                self.assertEqual(attune.cell(item, "k"), value)
                self.assertEqual(attune.cell(item, "k?"), attune.or_dash(value))
                self.assertEqual(attune.cell(item, "k@"), attune.format_timestamp(value))
                self.assertEqual(attune.cell(item, "k@?"), attune.or_dash(attune.format_timestamp(value)))
                self.assertEqual(attune.cell(item, "k~10"), attune.clip(value or "", 10))
        self.assertEqual([attune.cell({}, key) for key in ("k", "k?", "k@", "k@?", "k~5")], [None, "-", "", "-", ""])
        rows = [{"id": 3, "created": "2026-11-24T12:00:00Z"}]
        self.assertEqual(attune.table_of("ID=id|Created=created@|Note=note?", rows),
                         (["ID", "Created", "Note"], [[3, "2026-11-24 12:00:00", "-"]]))
        self.assertEqual(attune.labelled({"a": 1}, "A=a|B b=b?"), [("A", 1), ("B b", "-")])
        self.assertEqual(attune.cells({"a": 1, "b": ""}, "a b?"), [1, "-"])

    def test_a_command_draws_its_table_only_in_table_form(self):
        """emit_unless_table(): True (the caller draws its table) in table form alone; JSON,
        YAML and --fields are printed for the caller, and an empty list under --fields is left
        to the caller's table, which says 'No ... found'."""
        for flags, data, turn, printed in (
                ({}, {"a": 1, "b": 2}, True, ""),
                ({"json": True}, {"a": 1, "b": 2}, False, '{\n  "a": 1,\n  "b": 2\n}\n'),
                ({"yaml": True}, {"a": 1, "b": 2}, False, "a: 1\nb: 2\n"),
                ({"output": "json", "fields": "b"}, [{"a": 1, "b": 2}], False, '[\n  {\n    "b": 2\n  }\n]\n'),
                ({"fields": "b"}, {"a": 1, "b": 2}, False, "b:  2\n"),
                ({"fields": "b"}, [], True, "")):
            args = types.SimpleNamespace(**dict(dict(output=None, json=False, yaml=False, fields=None), **flags))
            out = io.StringIO()
            with self.subTest(flags=flags, data=data), contextlib.redirect_stdout(out):
                printer = attune.Printer(args, {}, lambda: None)
                self.assertIs(printer.emit_unless_table(data), turn)
                self.assertEqual(out.getvalue(), printed)
                self.assertEqual(printer.fields_used, "fields" in flags)

    def test_aligned_columns_with_header_and_rule(self):
        text = attune.render_table(["Ref", "Version"], [["core", "1.0.0"], ["linux", None]])
        self.assertEqual(text.split("\n"), ["Ref    Version", "─────  ───────", "core   1.0.0", "linux"])

    def test_fits_the_width_by_cutting_the_widest_column(self):
        rows = [["core", "x" * 100], ["linux", "short"]]
        text = attune.render_table(["Ref", "Description"], rows, width=40)
        for line in text.split("\n"):
            self.assertLessEqual(len(line), 40)
        self.assertIn("…", text)
        self.assertIn("short", text)

    def test_free_text_is_cut_before_identifiers(self):
        """A ref longer than its description is still whole at 60 columns: the Description and
        Label columns give up their width first (to 10 characters), and only then the widest."""
        rows = [["examples.deploy_service_to_production", "Deploy", "Deploys the service with a canary first"],
                ["core.echo", "Echo", "Print a message"]]
        for width in range(60, 100, 7):
            with self.subTest(width=width):
                lines = attune.render_table(["Ref", "Label", "Description"], rows, width=width).split("\n")
                self.assertTrue(all(len(line) <= width for line in lines), lines)
                self.assertTrue(lines[2].startswith("examples.deploy_service_to_production  "), lines)
        lines = attune.render_table(["Ref", "Description"], [[r[0], r[2]] for r in rows], width=30).split("\n")
        self.assertTrue(all(len(line) <= 30 for line in lines), lines)
        self.assertEqual(len(lines[2].split("  ")[-1]), 10)  # as far as free text goes; then the ref gives
        self.assertEqual(attune.fit_widths([40, 30], 50, free=[1]), [38, 10])

    def test_cells(self):
        self.assertEqual(attune.cell_text(True), "✓")
        self.assertEqual(attune.cell_text(False), "✗")
        self.assertEqual(attune.cell_text(["a", "b"]), "a, b")
        self.assertEqual(attune.cell_text("two\nlines"), "two lines")
        self.assertEqual(attune.cell_text({"a": 1}), '{"a": 1}')

    def test_pairs(self):
        self.assertEqual(attune.render_pairs([("ID", 1), ("Display Name", "x\ny")]),
                         "ID:            1\nDisplay Name:  x\n               y")


class ProxyTests(unittest.TestCase):
    def test_no_proxy_forms(self):
        match = attune.no_proxy_matches
        self.assertTrue(match("10.1.2.3", 80, "10.0.0.0/8"))
        self.assertFalse(match("11.1.2.3", 80, "10.0.0.0/8"))
        self.assertTrue(match("fd00::1", 80, "fd00::/8"))
        self.assertTrue(match("api.example.com", 443, "example.com"))
        self.assertTrue(match("api.example.com", 443, ".example.com"))
        self.assertTrue(match("api.example.com", 443, "*.example.com"))
        self.assertFalse(match("badexample.com", 443, "example.com"))
        self.assertTrue(match("example.com", 8443, "example.com:8443"))
        self.assertFalse(match("example.com", 443, "example.com:8443"))
        self.assertTrue(match("anything", 80, "*"))
        self.assertTrue(match("b.org", 80, "a.org, b.org"))
        self.assertFalse(match("host", 80, "not-a-cidr/99"))

    def test_proxy_choice(self):
        env = {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128",
               "HTTP_PROXY": "http://plain:3128", "NO_PROXY": "internal.example,10.0.0.0/8"}
        self.assertEqual(attune.proxy_for("https://api.example.com/x", env), "http://lower:3128")
        self.assertEqual(attune.proxy_for("http://api.example.com/x", env), "http://plain:3128")
        self.assertIsNone(attune.proxy_for("https://internal.example/x", env))
        self.assertIsNone(attune.proxy_for("https://10.2.3.4/x", env))
        for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:80"):
            self.assertIsNone(attune.proxy_for(url, env), url)
        self.assertEqual(attune.proxy_for("http://x.org", {"ALL_PROXY": "http://all:1"}), "http://all:1")


class MessageTests(unittest.TestCase):
    def response(self, status, body, reason="Reason"):
        return attune.Response(status, reason, {}, body if isinstance(body, bytes) else body.encode())

    def test_both_error_shapes(self):
        flat = self.response(409, '{"error": "Pack with ref \'x\' already exists", "code": "CONFLICT"}',
                             "Conflict")
        self.assertEqual(str(attune.api_error(flat)),
                         "API error (409 Conflict, code CONFLICT): Pack with ref 'x' already exists")
        nested = self.response(401, '{"error": {"code": 401, "message": "Authentication token expired"}}')
        self.assertEqual(attune.error_message(nested), "Authentication token expired")
        self.assertIsInstance(attune.api_error(nested), attune.AuthError)

    def test_html_is_status_line_and_first_200_characters(self):
        html = "<html><body>" + "Bad gateway " * 50 + "</body></html>"
        error = attune.api_error(self.response(502, html, "Bad Gateway"))
        self.assertIsInstance(error, attune.ServerError)
        text = str(error)
        self.assertTrue(text.startswith("API error (502 Bad Gateway): <html><body>Bad gateway"), text)
        self.assertLessEqual(len(text), len("API error (502 Bad Gateway): ") + 203)

    def test_exit_codes_by_status(self):
        for status, code in ((400, 1), (401, 4), (403, 1), (404, 1), (422, 1), (429, 1), (500, 6),
                             (503, 6)):
            self.assertEqual(attune.api_error(self.response(status, "{}")).exit_code, code, status)

    def test_redaction(self):
        body = {"login": "a", "password": "p", "can_change_password": True, "refresh_token": None,
                "data": [{"access_token": "t", "refresh_token": "r", "expires_in": 5, "token_type": "Bearer"}]}
        self.assertEqual(attune.redact(body), {
            "login": "a", "password": "***", "can_change_password": True, "refresh_token": None,
            "data": [{"access_token": "***", "refresh_token": "***", "expires_in": 5,
                      "token_type": "***"}]})


class FakeRouteTests(unittest.TestCase):
    """The fake server's route table, as @route declares it."""
    SAMPLES = {"[^/]+": "some.ref", r"\d+": "7", ".+": "some/deep.ref", "freeze|unfreeze": "freeze",
               "cordon|uncordon": "cordon", "workers|executions": "workers", "enable|disable|regenerate": "regenerate"}

    def sample(self, pattern):
        """A path pattern matches: each parameter filled in with a value of its kind."""
        return re.sub(r"\(\?P<\w+>([^()]+)\)", lambda m: self.SAMPLES[m.group(1)], pattern).replace("\\", "")

    def test_every_handler_exists_and_every_route_is_declared_once(self):
        server = FakeAttune()
        seen = set()
        for method, pattern, name, *_ in ROUTES:
            self.assertTrue(callable(getattr(server, name, None)), name)
            self.assertNotIn((method, pattern), seen)
            seen.add((method, pattern))
        self.assertGreater(len(ROUTES), 120)

    def test_no_request_matches_two_routes_with_parameters(self):
        """A path with parameters matches no other route with parameters for the same method,
        so which handler answers never depends on the order of the classes."""
        for method, pattern, name, *_ in ROUTES:
            path = self.sample(pattern)
            self.assertTrue(re.match(pattern + "$", path), (pattern, path))
            rivals = [other for m, p, other, *_ in ROUTES if m == method and other != name
                      and "(?P" in p and "(?P" in pattern and re.match(p + "$", path)]
            self.assertEqual(rivals, [], (method, path, name))

    def test_a_query_parameter_the_route_does_not_take_breaks_the_contract(self):
        server = FakeAttune()
        headers = {"Authorization": "Bearer " + server.mint("admin")}
        for target in ("/api/v1/events?page=1&per_page=5", "/api/v1/events/7", "/api/v1/workers?page_size=5"):
            server.handle(Seen("GET", target, headers, b""))
        self.assertEqual(server.contract_breaks, [])
        server.handle(Seen("GET", "/api/v1/events?page=1&page_size=5", headers, b""))  # events take per_page
        server.handle(Seen("GET", "/api/v1/events/7?tail=3", headers, b""))
        self.assertEqual(server.contract_breaks, ["GET /api/v1/events: ['page_size']", "GET /api/v1/events/7: ['tail']"])
        server.handle(Seen("POST", "/api/v1/workers/3/cordon", headers, b'{"reason": "kernel"}'))
        server.handle(Seen("POST", "/api/v1/workers/3/cordon", headers, b'{"why": "kernel"}'))
        server.handle(Seen("POST", "/api/v1/executions/7/reschedule", headers, b'{"force": true}'))
        self.assertEqual(server.contract_breaks[2:], ["POST /api/v1/workers/3/cordon: ['why']",
                                                      "POST /api/v1/executions/7/reschedule: ['force']"])

    def test_every_route_that_takes_a_body_declares_its_keys(self):
        undeclared = [(m, p) for m, p, _, _, _, keys in ROUTES if m in ("POST", "PUT", "PATCH") and keys is None]
        self.assertEqual(undeclared, [])

    def test_a_route_without_parameters_wins(self):
        server = FakeAttune()
        for path, handler in (("/api/v1/actions/search", "actions_search"), ("/api/v1/actions/core.echo",
                                                                             "actions_show")):
            with mock.patch.object(server, handler, return_value=(200, {"by": handler})):
                self.assertEqual(server.handle(Seen("GET", path, {"Authorization": "Bearer " + server.mint(
                    "admin")}, b"")), (200, {"by": handler}))

    def test_only_the_public_routes_answer_without_a_token(self):
        server = FakeAttune()
        public = sorted(p for m, p, _, anonymous, *_ in ROUTES if anonymous)
        self.assertEqual(public, ["/api/v1/info"])
        for method, pattern, name, anonymous, *_ in ROUTES:
            if pattern.startswith("/api/v1/") and not anonymous:
                status, body = server.handle(Seen(method, self.sample(pattern), {}, b""))
                self.assertEqual((status, body["error"]["code"]), (401, 401), (method, pattern))


class PathTests(unittest.TestCase):
    def path(self, env, config=None):
        return attune.credential_path(config, env)

    def test_precedence(self):
        env = {"ATTUNE_CONFIG": "/e/c.json", "XDG_CONFIG_HOME": "/xdg", "HOME": "/home/u"}
        self.assertEqual(self.path(env, "/f/c.json"), ("/f/c.json", "flag"))
        self.assertEqual(self.path(env), ("/e/c.json", "env"))
        del env["ATTUNE_CONFIG"]
        self.assertEqual(self.path(env), ("/xdg/attune/credentials.json", "env"))
        env["XDG_CONFIG_HOME"] = "relative/ignored"
        self.assertEqual(self.path(env), ("/home/u/.config/attune/credentials.json", "default"))

    def test_windows_uses_appdata(self):
        with mock.patch.object(attune, "WINDOWS", True):
            self.assertEqual(self.path({"APPDATA": "C:/Users/u/AppData/Roaming", "HOME": "/h"}),
                             (os.path.join("C:/Users/u/AppData/Roaming", "attune", "credentials.json"),
                              "default"))


# === Tests: the credential file ==============================================

class CredentialFileTests(AttuneTestCase):
    def login(self, *extra):
        return self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                       *extra, stdin=PASSWORD + "\n")

    def test_login_creates_private_directory_file_and_lock(self):
        self.login()
        directory = os.path.dirname(self.config)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(directory)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.config + ".lock").st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(directory)), ["credentials.json", "credentials.json.lock"])

    def test_existing_directory_is_never_chmodded(self):
        directory = os.path.dirname(self.config)
        os.makedirs(directory)
        os.chmod(directory, 0o755)
        self.login()
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o755)

    def test_unknown_keys_survive_every_rewrite(self):
        self.seed(access_left=-100, team_note="keep me")
        doc = self.read_doc()
        doc["future_setting"] = {"nested": [1, 2]}
        doc["profiles"]["other"] = {"api_url": "http://other.invalid", "color": "blue"}
        self.write_doc(doc)
        self.ok("auth", "whoami")                      # refresh
        self.ok("config", "set", "description", "x")   # config write
        self.login()                                   # login
        self.ok("auth", "logout")                      # logout
        doc = self.read_doc()
        self.assertEqual(doc["future_setting"], {"nested": [1, 2]})
        self.assertEqual(doc["profiles"]["other"], {"api_url": "http://other.invalid", "color": "blue"})
        self.assertEqual(doc["profiles"]["default"]["team_note"], "keep me")
        self.assertEqual(doc["version"], 1)

    def test_read_only_commands_never_create_the_file(self):
        token = self.server.mint("admin")
        env = {"ATTUNE_API_URL": self.server.url}
        for argv in (["auth", "status", "--offline"], ["config", "list"], ["config", "profiles"],
                     ["config", "get", "api_url"], ["config", "path"], ["config", "current"],
                     ["auth", "whoami"], ["auth", "token"]):
            self.ok(*argv, env=dict(env, ATTUNE_API_TOKEN=token), secrets_ok=True)
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_read_only_commands_never_rewrite_the_file(self):
        self.seed()
        before = self.snapshot()
        time.sleep(0.01)
        for argv in (["auth", "status"], ["auth", "status", "--all", "--offline"], ["config", "list"],
                     ["config", "profiles"], ["config", "show-profile", "default"], ["auth", "whoami"],
                     ["auth", "token"], ["config", "get", "format"]):
            self.ok(*argv, secrets_ok=True)
        self.assertEqual(self.snapshot(), before)
        self.assertFalse(os.path.exists(self.config + ".lock"))

    def test_newer_version_is_read_but_never_rewritten(self):
        self.seed()
        doc = self.read_doc()
        doc["version"] = 99
        self.write_doc(doc)
        before = self.snapshot()
        self.ok("auth", "whoami")
        result = self.fails(3, "config", "set", "description", "x")
        self.assertIn("newer attune.py (version 99)", result.err)
        self.assertIn(self.config, result.err)
        self.fails(3, "auth", "login", "-u", "admin", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(self.snapshot(), before)

    def test_newer_version_refuses_before_refreshing(self):
        self.seed(access_left=-100)
        doc = self.read_doc()
        doc["version"] = 2
        self.write_doc(doc)
        self.fails(3, "auth", "whoami")
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    def test_corrupt_files_exit_3_naming_the_file(self):
        cases = {"empty": b"", "truncated": b'{"version": 1, "profiles": {', "array": b"[]",
                 "profiles wrong type": b'{"profiles": []}', "invalid utf-8": b'{"a": "\xff"}',
                 "version not int": b'{"version": "1"}', "garbage": os.urandom(4096),
                 "NaN, which Python would accept": b'{"version": 1, "profiles": {"a": {"api_url": "x", "t": NaN}}}'}
        os.makedirs(os.path.dirname(self.config))
        for name, data in cases.items():
            with self.subTest(name):
                with open(self.config, "wb") as f:
                    f.write(data)
                os.chmod(self.config, 0o600)
                result = self.fails(3, "auth", "status", "--offline")
                self.assertIn(self.config, result.err)
                self.assertIn("mv ", result.err)
                with open(self.config, "rb") as f:
                    self.assertEqual(f.read(), data)

    def test_a_parse_failure_is_retried_once(self):
        self.seed()
        with open(self.config, "rb") as f:
            good = f.read()
        with open(self.config, "wb") as f:
            f.write(good[:20])
        pauses = []

        def writer_finishes(seconds):  # the pause before the retry is when the other writer renames
            pauses.append(seconds)
            tmp = self.config + ".new"
            with open(tmp, "wb") as f:
                f.write(good)
            os.replace(tmp, self.config)

        with mock.patch.object(attune.time, "sleep", writer_finishes):
            self.ok("auth", "status", "--offline")
        self.assertEqual(pauses, [0.1])

    def test_group_readable_file_warns_once_with_the_chmod_command(self):
        self.seed()
        os.chmod(self.config, 0o644)
        result = self.ok("auth", "status")
        self.assertEqual(result.err.count("chmod 600 %s" % self.config), 1, result.err)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o644)

    @unittest.skipUnless(IS_ROOT, "needs root to give the file away")
    def test_file_owned_by_another_user_warns(self):
        self.seed()
        os.chown(self.config, 65534, 65534)
        result = self.ok("auth", "status", "--offline")
        self.assertIn("owned by uid 65534", result.err)

    def test_profile_without_api_url_is_a_configuration_error(self):
        self.write_doc({"version": 1, "current_profile": "x", "profiles": {"x": {"description": "no url"}}})
        result = self.fails(3, "auth", "status", "--offline")
        self.assertIn("has no api_url", result.err)

    def test_broken_profile_does_not_break_the_others(self):
        self.seed()
        doc = self.read_doc()
        doc["profiles"]["broken"] = "not an object"
        self.write_doc(doc)
        self.ok("auth", "whoami")
        result = self.fails(3, "-p", "broken", "auth", "whoami")
        self.assertIn("attune config remove-profile broken", result.err)
        self.ok("config", "remove-profile", "broken")  # the advice works
        self.assertNotIn("broken", self.read_doc()["profiles"])

    def test_a_symlinked_file_is_read_but_never_written_through(self):
        target = os.path.join(self.tmp, "real", "creds.json")
        os.makedirs(os.path.dirname(target))
        os.makedirs(os.path.dirname(self.config))
        os.symlink(target, self.config)
        result = self.fails(3, "auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                            stdin=PASSWORD)  # dangling: written through only to an existing file
        self.assertIn("is a symbolic link to %r, which does not exist" % target, result.err)
        self.assertTrue(os.path.islink(self.config))
        self.assertFalse(os.path.exists(target))
        self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url, stdin=PASSWORD,
                env={"ATTUNE_CONFIG": target})  # the file itself: fine
        self.ok("auth", "whoami")  # and reading through the link is fine

    def test_a_file_with_ten_thousand_profiles(self):
        """One profile per customer or CI runner: read by the C parser, every profile survives a rewrite."""
        self.seed()
        doc = self.read_doc()
        doc["profiles"].update(many_profiles(10000))
        self.write_doc(doc)
        self.assertGreater(os.path.getsize(self.config), attune.LARGE_JSON)
        token = self.ok("auth", "token", secrets_ok=True).out.strip()
        self.assertEqual(token, doc["profiles"]["default"]["auth_token"])
        self.ok("-p", "customer-09999", "config", "set", "description", "the last one")
        after = self.read_doc()
        self.assertEqual(len(after["profiles"]), 10001)
        self.assertEqual(after["profiles"]["customer-09999"]["description"], "the last one")
        self.assertEqual(after["profiles"]["customer-00042"], doc["profiles"]["customer-00042"])

    def test_windows_rename_is_retried_while_a_reader_holds_the_file(self):
        real_replace, calls = os.replace, []

        def busy_twice(src, dst):
            calls.append(dst)
            if len(calls) <= 2:
                raise PermissionError(errno.EACCES, "Access is denied")
            real_replace(src, dst)

        with mock.patch.object(attune, "WINDOWS", True), mock.patch("os.replace", busy_twice):
            self.login()
        self.assertEqual(len(calls), 3)
        self.assertIn("auth_token", self.profile())
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.config))),
                         ["credentials.json", "credentials.json.lock"])

    def test_a_failed_write_leaves_no_temp_file(self):
        self.login()
        with mock.patch("os.replace", side_effect=OSError(errno.EIO, "I/O error")):
            result = self.fails(3, "config", "set", "description", "x")
        self.assertIn("cannot write credential file", result.err)
        self.assertIn("--config", result.err)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.config))),
                         ["credentials.json", "credentials.json.lock"])

    def test_config_flag_creates_missing_directories(self):
        path = os.path.join(self.tmp, "new", "dir", "c.json")
        self.ok("--config", path, "config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        with open(path) as f:
            self.assertEqual(json.load(f)["profiles"]["p"]["api_url"], "http://x.invalid")


# === Tests: the lock =========================================================

LOCK_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, ("%d attune auth login\n" % os.getpid()).encode())
if len(sys.argv) > 3:  # store tokens while holding the lock, like a refreshing process
    with open(sys.argv[3], "w") as f:
        f.write(sys.argv[4])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@unittest.skipUnless(POSIX, "fcntl lock tests")
class LockTests(AttuneTestCase):
    def hold_lock(self, seconds, doc=None):
        """A real process holding the credential lock for `seconds`."""
        os.makedirs(os.path.dirname(self.config), exist_ok=True)
        argv = [sys.executable, "-c", LOCK_HOLDER, self.config + ".lock", str(seconds)]
        if doc is not None:
            argv += [self.config, json.dumps(doc)]
        holder = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        return holder

    def test_lock_file_is_kept_and_names_its_last_holder(self):
        self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        with open(self.config + ".lock") as f:
            self.assertEqual(f.read(), "%d attune config add-profile\n" % os.getpid())
        self.ok("config", "remove-profile", "p")
        self.assertTrue(os.path.exists(self.config + ".lock"))

    def test_waits_for_the_holder_and_says_who_it_is(self):
        holder = self.hold_lock(1.4)
        started = time.monotonic()
        result = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertIn("waiting for pid %d (attune auth login)" % holder.pid, result.err)
        self.assertEqual(self.profile("p")["api_url"], "http://x.invalid")

    def test_deadline_passes_then_goes_on_unlocked_with_a_warning(self):
        self.hold_lock(30)
        result = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid",
                         env={"ATTUNE_LOCK_TIMEOUT": "0.3"})
        self.assertIn("gave up waiting", result.err)
        self.assertEqual(self.profile("p")["api_url"], "http://x.invalid")

    def test_at_the_deadline_a_token_stored_by_the_holder_is_used(self):
        self.seed(access_left=-100)
        doc = self.read_doc()
        fresh = self.server.mint("admin")
        doc["profiles"]["default"]["auth_token"] = fresh
        doc["profiles"]["default"]["auth_token_expires_at"] = int(time.time()) + 3600
        self.hold_lock(30, doc)
        self.ok("auth", "whoami", env={"ATTUNE_LOCK_TIMEOUT": "0.3"})
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)
        self.assertEqual(self.server.requests[-1].token, fresh)

    def test_flock_refused_falls_back_to_lockf(self):
        real = attune.fcntl
        calls = []

        class NoFlock:
            LOCK_EX, LOCK_NB, LOCK_UN = real.LOCK_EX, real.LOCK_NB, real.LOCK_UN

            @staticmethod
            def flock(fd, op):
                raise OSError(errno.ENOLCK, "No locks available")

            @staticmethod
            def lockf(fd, op):
                calls.append(op)
                return real.lockf(fd, op)

        with mock.patch.object(attune, "fcntl", NoFlock):
            self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertEqual(calls, [real.LOCK_EX | real.LOCK_NB, real.LOCK_UN])

    def test_no_lock_at_all_goes_on_with_a_verbose_warning(self):
        class NoLocks:
            LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

            @staticmethod
            def flock(fd, op):
                raise OSError(errno.ENOLCK, "No locks available")

            lockf = flock

        with mock.patch.object(attune, "fcntl", NoLocks):
            quiet = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
            loud = self.ok("-v", "config", "add-profile", "q", "--api-url", "http://y.invalid")
        self.assertNotIn("lock", quiet.err)
        self.assertIn("refuses locks", loud.err)
        self.assertEqual(sorted(self.read_doc()["profiles"]), ["p", "q"])


class WindowsLockTests(unittest.TestCase):
    """The msvcrt path, against a stand-in that behaves like msvcrt.locking."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="attune-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.fake = FakeMsvcrt()
        for name, value in (("fcntl", None), ("msvcrt", self.fake)):
            patcher = mock.patch.object(attune, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.path = os.path.join(self.tmp, "c.json.lock")
        self.warnings = []

    def lock(self, timeout=5.0):
        return attune.FileLock(self.path, timeout, "attune test", self.warnings.append, lambda m: None)

    def test_locks_one_byte_at_offset_zero_and_unlocks_before_closing(self):
        with self.lock() as held:
            self.assertTrue(held.held)
            self.assertEqual(self.fake.calls, [(FakeMsvcrt.LK_NBLCK, 0, 1)])
        self.assertEqual(self.fake.calls[-1], (FakeMsvcrt.LK_UNLCK, 0, 1))
        self.assertEqual(self.fake.held, {})

    def test_second_locker_waits_until_released(self):
        first = self.lock()
        first.acquire()
        threading.Timer(0.2, first.release).start()
        started = time.monotonic()
        with self.lock() as second:
            self.assertTrue(second.held)
        self.assertGreaterEqual(time.monotonic() - started, 0.15)

    def test_deadline_gives_up_with_a_warning(self):
        first = self.lock()
        first.acquire()
        self.addCleanup(first.release)
        with self.lock(timeout=0.2) as second:
            self.assertFalse(second.held)
        self.assertTrue(any("gave up waiting" in w for w in self.warnings), self.warnings)


# === Tests: which profile, URL and token =====================================

class PrecedenceTests(AttuneTestCase):
    def status(self, *argv, env=None):
        result = self.run_cli(*(argv + ("auth", "status", "--offline", "-j")), env=env)
        self.assertIn(result.code, (0, 4), result)
        return result.json()

    def test_profile_flag_env_file_default(self):
        self.seed("a")
        self.seed("b")
        self.seed("c", current=True)
        self.assertEqual(self.status("-p", "a", env={"ATTUNE_PROFILE": "b"})["profile"], "a")
        self.assertEqual(self.status(env={"ATTUNE_PROFILE": "b"})["profile"], "b")
        self.assertEqual(self.status()["profile"], "c")
        doc = self.read_doc()
        del doc["current_profile"]
        self.write_doc(doc)
        self.assertEqual(self.status()["profile"], "default")

    def test_unknown_profile_exits_3_listing_the_known_ones(self):
        self.seed("prod")
        self.seed("staging")
        result = self.fails(3, "-p", "nope", "auth", "status")
        self.assertIn("Profile 'nope' does not exist", result.err)
        self.assertIn("default, prod, staging", result.err)
        self.assertIn("to create it: attune config add-profile nope --api-url URL", result.err)
        self.assertEqual(len(result.err.splitlines()), 1)
        self.fails(3, "auth", "status", env={"ATTUNE_PROFILE": "nope"})

    def test_profile_flag_never_changes_the_current_profile(self):
        self.seed("a")
        self.seed("b", current=True)
        self.ok("-p", "a", "auth", "whoami")
        self.ok("auth", "refresh", "--profile", "a")
        self.assertEqual(self.read_doc()["current_profile"], "b")

    def test_api_url_flag_env_profile_default(self):
        self.seed()
        env = {"ATTUNE_API_URL": "http://env.invalid"}
        got = self.status("--api-url", "http://flag.invalid", env=env)
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://flag.invalid", "flag"))
        got = self.status(env=env)
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://env.invalid", "env"))
        got = self.status()
        self.assertEqual((got["api_url"], got["api_url_source"]), (self.server.url, "file"))
        os.remove(self.config)
        got = self.status()
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://localhost:8080", "default"))

    def token_json(self, *argv, env=None):
        return self.ok(*(argv + ("auth", "token", "--format", "json")), env=env, secrets_ok=True).json()

    def test_token_sources_in_order(self):
        stored = self.seed()["auth_token"]
        api, auth, from_file = (self.server.mint("admin") for _ in range(3))
        token_file = os.path.join(self.tmp, "token")
        with open(token_file, "w") as f:
            f.write(from_file + "\n")
        env = {"ATTUNE_API_TOKEN": api, "ATTUNE_AUTH_TOKEN": auth, "ATTUNE_TOKEN_FILE": token_file}
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source"], got["source_detail"]),
                         (api, "env", "ATTUNE_API_TOKEN"))
        del env["ATTUNE_API_TOKEN"]
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source_detail"]), (auth, "ATTUNE_AUTH_TOKEN"))
        del env["ATTUNE_AUTH_TOKEN"]
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source"], got["source_detail"]),
                         (from_file, "token_file", token_file))
        got = self.token_json()
        self.assertEqual((got["token"], got["source"], got["source_detail"]), (stored, "file", "default"))

    def test_profile_flag_uses_stored_tokens_even_with_environment_tokens(self):
        stored = self.seed()["auth_token"]
        got = self.token_json("-p", "default", env={"ATTUNE_API_TOKEN": self.server.mint("admin")})
        self.assertEqual((got["token"], got["source"], got["profile_source"]), (stored, "file", "flag"))

    def test_every_source_of_each_value_in_every_combination(self):
        """The profile, the URL and the token, each from every place it can come from,
        in all combinations: what auth token reports is what the request then carries."""
        stored = {name: self.seed(name, current=False)["auth_token"] for name in ("default", "b")}
        from_env = self.server.mint("admin")
        for profile_from in ("flag", "env", "file", "default"):
            for url_from in ("flag", "env", "file"):
                for token_from in ("env", "file"):
                    doc = self.read_doc()
                    doc.pop("current_profile", None)
                    argv, env = [], {}
                    if profile_from == "flag":
                        argv += ["-p", "b"]
                    elif profile_from == "env":
                        env["ATTUNE_PROFILE"] = "b"
                    elif profile_from == "file":
                        doc["current_profile"] = "b"
                    self.write_doc(doc)
                    if url_from == "flag":
                        argv += ["--api-url", self.server.url + "/"]
                    elif url_from == "env":
                        env["ATTUNE_API_URL"] = self.server.url
                    if token_from == "env":
                        env["ATTUNE_API_TOKEN"] = from_env
                    case = (profile_from, url_from, token_from)
                    got = self.token_json(*argv, env=env)
                    profile = "default" if profile_from == "default" else "b"
                    source = "file" if token_from == "file" or profile_from == "flag" else "env"
                    token = stored[profile] if source == "file" else from_env
                    self.assertEqual((got["profile"], got["profile_source"], got["api_url"], got["api_url_source"],
                                      got["source"], got["token"]),
                                     (profile, profile_from, self.server.url, url_from, source, token), case)
                    self.ok(*(argv + ["auth", "whoami"]), env=env)
                    self.assertEqual(self.server.requests[-1].token, token, case)

    def test_an_empty_profile_name_is_a_usage_error_for_every_command(self):
        for argv in (["auth", "token"], ["config", "path"], ["config", "current"], ["pack", "list"]):
            for flag in (["-p", ""], ["--profile="]):
                self.assertIn("-p/--profile needs a profile name", self.fails(2, *(flag + argv)).err)

    def test_token_file_is_reread_on_every_run(self):
        token_file = os.path.join(self.tmp, "token")
        env = {"ATTUNE_TOKEN_FILE": token_file, "ATTUNE_API_URL": self.server.url}
        for _ in range(2):
            token = self.server.mint("admin")
            with open(token_file, "w") as f:
                f.write(token)
            self.assertEqual(self.ok("auth", "token", env=env, secrets_ok=True).out, token + "\n")
            self.ok("auth", "whoami", env=env)
            self.assertEqual(self.server.requests[-1].token, token)

    def test_environment_tokens_are_refreshed_in_memory_and_never_written(self):
        now = int(time.time())
        expired = self.server.mint("admin", ttl=3600, iat=now - 4000)
        refresh = self.server.mint("admin", "refresh")
        self.ok("auth", "whoami", env={"ATTUNE_API_TOKEN": expired, "ATTUNE_REFRESH_TOKEN": refresh,
                                       "ATTUNE_API_URL": self.server.url})
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/me"])
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_expired_environment_token_without_refresh_token_exits_4(self):
        expired = self.server.mint("admin", ttl=3600, iat=int(time.time()) - 4000)
        result = self.fails(4, "auth", "whoami", env={"ATTUNE_API_TOKEN": expired,
                                                      "ATTUNE_API_URL": self.server.url})
        self.assertIn("ATTUNE_API_TOKEN has expired", result.err)
        self.assertEqual(self.server.count(), 0)

    def test_output_flags_before_or_after_the_subcommand(self):
        self.seed()
        for argv in (["-j", "auth", "whoami"], ["auth", "-j", "whoami"], ["auth", "whoami", "-j"],
                     ["auth", "whoami", "--output", "json"], ["--output=json", "auth", "whoami"]):
            self.assertEqual(self.ok(*argv).json()["login"], "admin", argv)
        self.assertTrue(self.ok("auth", "whoami", "-y").out.startswith("id: 1\nlogin: admin\n"))
        result = self.fails(2, "-j", "auth", "whoami", "-y")
        self.assertIn("choose one output format", result.err)

    def test_stored_format_is_the_default_output(self):
        self.seed()
        self.ok("config", "set", "format", "json")
        self.assertEqual(self.ok("auth", "whoami").json()["login"], "admin")
        self.assertIn("Login:", self.ok("auth", "whoami", "--output", "table").out)



# === Tests: token lifecycle ==================================================

def session_for(test, *argv, env=None):
    """A Session built the way main() builds one, for tests below the command level."""
    args = attune.build_parser().parse_args(list(argv) + ["auth", "whoami"])
    return attune.Context(args, test.environ(env)).session()


class TokenLifecycleTests(AttuneTestCase):
    def refreshes(self):
        return self.server.count("POST", "/auth/refresh")

    def test_a_valid_token_costs_one_request(self):
        self.seed()
        self.ok("auth", "whoami")
        self.assertEqual(self.server.log(), ["GET /auth/me"])

    def test_a_known_expired_token_costs_two_requests(self):
        old = self.seed(access_left=-100)
        self.ok("auth", "whoami")
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/me"])
        refresh_call = self.server.requests[0]
        self.assertEqual(refresh_call.json(), {"refresh_token": old["refresh_token"]})
        self.assertNotIn("Authorization", refresh_call.headers)
        new = self.profile()
        self.assertNotEqual(new["auth_token"], old["auth_token"])
        self.assertEqual(self.server.requests[1].token, new["auth_token"])
        self.assertIsNone(new["invalidated_at"])

    def test_a_revoked_token_costs_three_requests(self):
        old = self.seed()
        self.server.revoked.add(old["auth_token"])
        self.ok("auth", "whoami")
        self.assertEqual(self.server.log(), ["GET /auth/me", "POST /auth/refresh", "GET /auth/me"])
        self.assertEqual(self.server.requests[2].token, self.profile()["auth_token"])

    def test_proactive_refresh_at_ten_percent_of_the_lifetime(self):
        self.seed(access_left=3000, access_ttl=3600)  # margin 300 s
        start = time.time()
        self.ok("auth", "whoami", clock=lambda: start + 2695)  # 305 s left
        self.assertEqual(self.refreshes(), 0)
        self.ok("auth", "whoami", clock=lambda: start + 2705)  # 295 s left
        self.assertEqual(self.refreshes(), 1)

    def test_the_margin_is_at_least_30_seconds(self):
        self.seed(access_left=100, access_ttl=100)
        start = time.time()
        self.ok("auth", "whoami", clock=lambda: start + 65)  # 35 s left
        self.assertEqual(self.refreshes(), 0)
        self.ok("auth", "whoami", clock=lambda: start + 75)  # 25 s left
        self.assertEqual(self.refreshes(), 1)

    def test_access_expiry_is_send_time_plus_expires_in_whatever_the_server_clock(self):
        self.server.clock_offset = -7200  # the server's clock is two hours behind
        before = time.time()
        self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                stdin=PASSWORD + "\n")
        stored = self.profile()
        self.assertLess(attune.jwt_expiry(stored["auth_token"]), before)  # by the JWT: long expired
        self.assertGreaterEqual(stored["auth_token_expires_at"], int(before) + 3600 - 1)
        self.assertLessEqual(stored["auth_token_expires_at"], time.time() + 3600)
        self.ok("auth", "whoami")
        self.assertEqual(self.refreshes(), 0)

    def test_refresh_token_expiry_is_receipt_time_plus_its_lifetime(self):
        self.server.clock_offset = 50000  # the server's clock is far ahead
        self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                stdin=PASSWORD + "\n")
        expires = self.profile()["refresh_token_expires_at"]
        self.assertAlmostEqual(expires, time.time() + 7 * 86400, delta=5)

    def test_hand_seeded_tokens_use_the_jwt_exp(self):
        self.seed(access_left=3000, store_expiry=False)
        self.ok("auth", "whoami")
        self.assertEqual(self.refreshes(), 0)
        self.seed(access_left=-100, store_expiry=False)
        self.ok("auth", "whoami")
        self.assertEqual(self.refreshes(), 1)

    def test_an_opaque_token_has_unknown_expiry_and_relies_on_the_401(self):
        self.seed(store_expiry=False, auth_token="opaque-access-token")
        self.extra_secrets = {"opaque-access-token"}
        self.ok("auth", "whoami")
        self.assertEqual(self.server.log(), ["GET /auth/me", "POST /auth/refresh", "GET /auth/me"])

    def test_transient_refresh_failure_keeps_a_token_that_is_still_valid(self):
        self.seed(access_left=200)  # inside the 300 s margin, but 200 s is plenty
        self.server.fail("/auth/refresh", status=503, body={"error": "busy", "code": "X"})
        before = self.snapshot()
        result = self.ok("-v", "auth", "whoami")
        self.assertIn("refresh failed", result.err)
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/me"])
        self.assertEqual(self.snapshot()[0], before[0])

    def test_transient_refresh_failure_with_little_left_exits_6_and_keeps_tokens(self):
        self.seed(access_left=20)
        self.server.fail("/auth/refresh", status=503, body={"error": "busy", "code": "X"})
        before = self.snapshot()
        self.fails(6, "auth", "whoami")
        self.assertEqual(self.snapshot()[0], before[0])

    def test_refresh_network_failure_exits_5_and_keeps_tokens(self):
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", drop=True)
        before = self.snapshot()
        self.fails(5, "auth", "whoami")
        self.assertEqual(self.snapshot()[0], before[0])

    def test_a_rejected_refresh_invalidates_the_session(self):
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", status=401,
                         body={"error": "Invalid or expired refresh token", "code": "UNAUTHORIZED"})
        result = self.fails(4, "auth", "whoami")
        self.assertIn("Session for profile 'default' has expired; run: attune auth login --profile default",
                      result.err)
        self.assertAlmostEqual(self.profile()["invalidated_at"], time.time(), delta=5)
        seen = self.server.count()
        result = self.fails(4, "auth", "whoami")  # later runs fail at once, without network
        self.assertIn("Session for profile 'default' has expired", result.err)
        self.assertEqual(self.server.count(), seen)
        self.fails(4, "auth", "status", "--offline")

    def test_an_invalidated_profile_with_a_live_access_token_still_works(self):
        self.seed(access_left=3000, invalidated_at=int(time.time()) - 10)
        self.ok("auth", "whoami")
        self.assertEqual(self.server.log(), ["GET /auth/me"])

    def test_status_of_an_invalidated_session_says_how_long_it_lasts_not_logged_in(self):
        """Invalidated with a live access token: usable (exit 0) until it expires, and the
        status says exactly that and what to run; once it has expired: login needed, exit 4."""
        self.seed(access_left=3000, invalidated_at=int(time.time()) - 10)
        for extra in (["--offline"], []):
            out = self.ok("auth", "status", *extra).out
            status = [line for line in out.splitlines() if line.startswith("Status:")]
            self.assertEqual(len(status), 1, out)
            self.assertIn("usable until the access token expires, not after (the refresh was refused); "
                          "run: attune auth login --profile default", status[0])
            self.assertNotIn("logged in", status[0])
            self.assertIn("Session:", out)
            self.assertIn("invalidated at", out)
        self.assertTrue(self.ok("auth", "status", "--offline", "-j").json()["logged_in"])
        self.seed(access_left=-100, invalidated_at=int(time.time()) - 10)
        out = self.fails(4, "auth", "status", "--offline").out
        self.assertIn("Status:", out)
        self.assertIn("login needed", out)

    def test_status_with_the_server_down_is_not_a_login_needed(self):
        """A server that cannot be reached (or fails) is said as such, with what the stored
        session allows, never 'login needed' for a session with most of an hour left; the
        exit code is the network's (5) or the server's (6) either way."""
        for access_left, failure, code, state in (
                (3360, {"drop": True}, 5, "server unreachable"),
                (-100, {"drop": True}, 5, "server unreachable"),  # the refresh cannot be sent either
                (3360, {"status": 503, "body": {"error": "busy", "code": "X"}}, 6, "server error")):
            with self.subTest(access_left=access_left, code=code):
                with self.server.lock:
                    self.server.faults.clear()
                self.seed(access_left=access_left)
                for path in ("/auth/me", "/auth/refresh"):
                    self.server.fail(path, times=None, **failure)
                out = self.fails(code, "auth", "status").out
                status = [" ".join(line.split()) for line in out.splitlines() if line.startswith("Status:")]
                self.assertEqual(status, ["Status: %s; the session stored here has not expired (no login is needed)"
                                          % state], out)
                self.assertNotIn("login needed", out)
                doc = self.fails(code, "-j", "auth", "status").json()
                self.assertEqual((doc["state"], doc["usable_here"], doc["logged_in"], doc["server"]["reachable"]),
                                 (state, True, False, code == 6))
        with self.server.lock:
            self.server.faults.clear()
        stopped = FakeAttune().start()  # a server that was there and is gone: connection refused
        stopped.stop()
        self.seed(access_left=3360, api_url=stopped.url)
        out = self.fails(5, "auth", "status").out
        self.assertIn("connection refused", out)
        self.assertRegex(out, r"Status: +server unreachable; the session stored here has not expired")
        self.seed(access_left=-100, refresh_left=-100)
        self.assertRegex(self.fails(4, "auth", "status").out, r"Status: +login needed\n")  # nothing to ask with

    def test_a_rejected_refresh_retries_with_a_refresh_token_stored_meanwhile(self):
        self.seed(access_left=-100)
        newer = self.server.mint("admin", "refresh")
        self.server.fail("/auth/refresh", status=401, delay=0.3,
                         body={"error": "Invalid or expired refresh token", "code": "UNAUTHORIZED"})

        def unlocked_writer():  # another process that does not honour the lock
            deadline = time.monotonic() + 30
            while not self.server.count("POST", "/auth/refresh") and time.monotonic() < deadline:
                time.sleep(0.005)  # write while the first refresh is in flight
            doc = self.read_doc()
            doc["profiles"]["default"]["refresh_token"] = newer
            tmp = self.config + ".other"
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.config)

        writer = threading.Thread(target=unlocked_writer)
        writer.start()
        self.ok("auth", "whoami")
        writer.join()
        refreshes = [r.json()["refresh_token"] for r in self.server.requests if r.path == "/auth/refresh"]
        self.assertEqual(refreshes[1:], [newer])
        self.assertIsNone(self.profile()["invalidated_at"])

    def test_a_known_expired_refresh_token_is_never_sent(self):
        self.seed(access_left=-100, refresh_left=-10)
        result = self.fails(4, "auth", "whoami")
        self.assertIn("Session for profile 'default' has expired", result.err)
        self.assertEqual(self.server.count(), 0)

    def test_403_is_never_a_refresh_trigger(self):
        self.seed()
        self.server.fail("/auth/me", status=403, body={"error": "Identity is frozen", "code": "FORBIDDEN"})
        result = self.fails(1, "auth", "whoami")
        self.assertIn("API error (403 Forbidden, code FORBIDDEN): Identity is frozen", result.err)
        self.assertEqual(self.server.log(), ["GET /auth/me"])

    def test_a_second_401_exits_4(self):
        self.seed()
        self.server.fail("/auth/me", status=401, times=2, body={"error": "Unauthorized", "code": "UNAUTHORIZED"})
        result = self.fails(4, "auth", "whoami")
        self.assertIn("rejected the refreshed token", result.err)
        self.assertEqual(self.server.log(), ["GET /auth/me", "POST /auth/refresh", "GET /auth/me"])

    def test_the_retry_after_a_401_sends_the_same_bytes(self):
        old = self.seed()
        self.server.revoked.add(old["auth_token"])
        session = session_for(self)
        resp = session.request("POST", "/packs", {"ref": "new", "label": "Ünï", "version": "1.0.0"})
        self.assertEqual(resp.status, 201)
        posts = [r for r in self.server.requests if r.path == "/api/v1/packs"]
        self.assertEqual(len(posts), 2)
        self.assertEqual(posts[0].body, posts[1].body)
        self.assertEqual((posts[0].token, posts[1].token), (old["auth_token"], self.profile()["auth_token"]))

    def test_compare_and_refresh_uses_a_token_another_process_stored(self):
        self.seed(access_left=-100)
        session = session_for(self)
        other = self.seed(access_left=3000)  # "another process" refreshed meanwhile
        session.refresh()
        self.assertEqual(self.refreshes(), 0)
        self.assertEqual(session.creds.access, other["auth_token"])

    def test_a_fresh_short_lived_token_is_not_refreshed_again(self):
        self.server.access_ttl = 20  # shorter than the 30 s minimum margin: half of it, 10 s
        self.seed(access_left=5, access_ttl=20)
        session = session_for(self)
        session.token()
        session.token()
        session.token()
        self.assertEqual(self.refreshes(), 1)

    def test_a_garbage_refresh_answer_leaves_the_tokens_alone(self):
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", status=200, body=b"<html>surprise</html>")
        before = self.snapshot()
        result = self.fails(1, "auth", "whoami")
        self.assertIn("not understood", result.err)
        self.assertEqual(self.snapshot()[0], before[0])

    def test_a_server_without_refresh_rotation_keeps_the_old_refresh_token(self):
        old = self.seed(access_left=-100)
        access = self.server.mint("admin")
        self.server.fail("/auth/refresh", status=200, body={"data": {
            "access_token": access, "token_type": "Bearer", "expires_in": 3600}})
        self.ok("auth", "whoami")
        self.assertEqual((self.profile()["auth_token"], self.profile()["refresh_token"]),
                         (access, old["refresh_token"]))

    def test_single_use_server_rejects_a_reused_refresh_token(self):
        self.server.refresh_mode = "single-use"
        old = self.seed(access_left=-100)
        self.ok("auth", "whoami")
        doc = self.read_doc()
        doc["profiles"]["default"].update(old)  # put the used pair back
        self.write_doc(doc)
        self.fails(4, "auth", "whoami")
        self.assertEqual(self.refreshes(), 2)


# === Tests: HTTP =============================================================

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpTests(AttuneTestCase):
    def test_user_agent_and_accept(self):
        self.seed()
        self.ok("auth", "whoami")
        headers = self.server.requests[0].headers
        self.assertEqual(headers["User-Agent"], "attune.py/%s python/%d.%d"
                         % ((attune.__version__,) + tuple(sys.version_info[:2])))
        self.assertEqual(headers["Accept"], "application/json")

    def test_a_read_timeout_exits_5(self):
        self.seed()
        self.server.fail("/auth/me", delay=2, status=200, body={})
        result = self.fails(5, "auth", "whoami", env={"ATTUNE_TIMEOUT": "0.3"})
        self.assertIn("no answer from", result.err)
        self.assertIn("ATTUNE_TIMEOUT", result.err)

    def test_connection_refused_exits_5(self):
        token = self.server.mint("admin")
        url = "http://127.0.0.1:%d" % free_port()
        result = self.fails(5, "auth", "whoami", env={"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": url})
        self.assertIn("connection refused", result.err)

    def test_bad_timeout_settings_are_configuration_errors(self):
        for name, value in (("ATTUNE_TIMEOUT", "soon"), ("ATTUNE_TIMEOUT", "0"), ("ATTUNE_TIMEOUT", "nan"),
                            ("ATTUNE_LOCK_TIMEOUT", "-1"), ("ATTUNE_LOCK_TIMEOUT", "inf")):
            self.assertIn(name, self.fails(3, "auth", "status", env={name: value}).err)
        self.seed()
        self.ok("config", "set", "description", "x", env={"ATTUNE_LOCK_TIMEOUT": "0"})

    def test_get_is_retried_on_503_and_dropped_connections(self):
        self.seed()
        self.server.fail("/auth/me", status=503, body={"error": "busy", "code": "RETRYABLE_DATABASE_ERROR"})
        self.server.fail("/auth/me", drop=True)
        self.ok("auth", "whoami")
        self.assertEqual(self.server.count("GET", "/auth/me"), 3)

    def test_server_errors_after_the_retries_exit_6(self):
        self.seed()
        self.server.fail("/auth/me", status=502, times=None, headers={"Content-Type": "text/html"},
                         body="<html><body><h1>502 Bad Gateway</h1></body></html>")
        result = self.fails(6, "auth", "whoami")
        self.assertIn("API error (502 Bad Gateway): <html><body><h1>502 Bad Gateway</h1>", result.err)
        self.assertEqual(self.server.count("GET", "/auth/me"), 3)

    def test_post_is_never_retried(self):
        self.seed()
        self.server.fail("/api/v1/packs", status=503, times=None, body={"error": "busy", "code": "X"})
        resp = session_for(self).request("POST", "/packs", {"ref": "x", "label": "X", "version": "1"})
        self.assertEqual(resp.status, 503)
        self.assertEqual(self.server.count("POST", "/api/v1/packs"), 1)

    def test_error_messages_from_both_shapes(self):
        self.seed()
        self.server.fail("/auth/me", status=404, body={"error": "Identity not found", "code": "NOT_FOUND"})
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Identity not found", self.fails(1, "auth", "whoami").err)
        session = session_for(self)
        resp = session.transport.request(attune.HttpRequest("GET", session.url("/packs"), token="bogus"))
        self.assertEqual(attune.error_message(resp), "Invalid authentication token")

    def test_a_same_origin_redirect_keeps_the_token(self):
        token = self.seed()["auth_token"]
        self.server.fail("/auth/me", status=307, headers={"Location": "/auth/me?moved=1"})
        self.ok("auth", "whoami")
        self.assertEqual([r.token for r in self.server.requests], [token, token])
        self.assertEqual(self.server.requests[1].target, "/auth/me?moved=1")
        self.server.contract_breaks.clear()  # the server's own Location, followed as given

    def test_a_redirect_to_another_origin_is_refused(self):
        other = FakeAttune().start()
        self.addCleanup(other.stop)
        self.seed()
        self.server.fail("/auth/me", status=302, headers={"Location": other.url + "/auth/me"})
        result = self.fails(1, "auth", "whoami")
        self.assertIn("redirect to another origin", result.err)
        self.assertEqual(other.count(), 0)

    def tls_server(self):
        server = FakeAttune(tls=True).start()
        self.addCleanup(server.stop)
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        return server, ca

    def test_a_wrong_api_url_is_explained_by_every_command(self):
        """An API URL ending in /api/v1 (or /api), https:// for a plain-HTTP server, or a path
        that serves a web page: every command's error says what is wrong with the URL, as auth
        login's does; a URL that is right gets no such hint, even for a 404."""
        self.seed()
        lists = [list(cmd.path) for cmd in attune.COMMANDS if cmd.path[-1] == "list" and not any(
            not f[0].startswith("-") or s.get("required") for f, s in cmd.arguments) and len(cmd.path) == 2
                 and cmd.path[0] != "config"]  # the lists of the server's resources
        self.assertGreater(len(lists), 15)
        for suffix in ("/api/v1", "/api/v1/", "/api"):
            for argv in sampled(lists) + [["pack", "show", "core"], ["auth", "whoami"]]:
                with self.subTest(suffix=suffix, argv=argv):
                    err = self.fails(1, "--api-url", self.server.url + suffix, *argv).err
                    self.assertIn("ends in /%s, which attune.py adds itself: give the server's address alone"
                                  % suffix.strip("/"), err)
        self.assertIn("no Attune login at", self.fails(1, "auth", "login", "-u", "admin", "--password-stdin", "--url",
                                                       self.server.url + "/api/v1", stdin=PASSWORD).err)
        https = "https" + self.server.url[len("http"):]
        for argv in (["auth", "whoami"], ["pack", "list"]):
            err = self.fails(5, "--api-url", https, *argv, env={"ATTUNE_API_TOKEN": self.server.mint("admin")}).err
            self.assertIn("it answers without TLS: if it serves plain HTTP, the URL starts with http://", err)
        self.server.fail(re.compile("/site/.*"), status=404, body="<html>Not here</html>",
                         headers={"Content-Type": "text/html"}, times=None)
        err = self.fails(1, "--api-url", self.server.url + "/site", "pack", "list").err
        self.assertIn("answered with something else than Attune's API: is /site part of the API's address?", err)
        err = self.fails(1, "pack", "show", "no-such-pack").err
        self.assertNotIn("address", err)
        self.assertEqual(attune.wrong_url_hint("https://h/myapi", attune.Response(404, "", {"Content-Type":
                                                                                        "application/json"}, b"")), "")
        self.assertIn("ends in /api,", attune.wrong_url_hint("https://h/x/api/", attune.Response(404, "", {}, b"")))

    def test_an_https_to_http_redirect_is_refused(self):
        tls, ca = self.tls_server()
        self.seed(api_url=tls.url)
        tls.fail("/auth/me", status=302, headers={"Location": self.server.url + "/auth/me"})
        result = self.fails(1, "--ca-bundle", ca, "auth", "whoami")
        self.assertIn("from https to http", result.err)
        self.assertEqual(self.server.count(), 0)

    def test_an_untrusted_certificate_exits_5_suggesting_ca_bundle(self):
        tls, _ = self.tls_server()
        self.seed(api_url=tls.url)
        result = self.fails(5, "auth", "whoami")
        self.assertIn("not trusted", result.err)
        self.assertIn("--ca-bundle", result.err)

    def test_a_ca_bundle_from_flag_environment_or_profile_is_trusted(self):
        tls, ca = self.tls_server()
        self.seed(api_url=tls.url)
        self.ok("--ca-bundle", ca, "auth", "whoami")
        self.ok("auth", "whoami", env={"ATTUNE_CA_BUNDLE": ca})
        self.ok("config", "set", "ca_bundle", ca)
        self.ok("auth", "whoami")
        self.assertEqual(tls.count("GET", "/auth/me"), 3)
        missing = self.fails(3, "--ca-bundle", os.path.join(self.tmp, "nope.pem"), "auth", "whoami")
        self.assertIn("cannot load CA bundle", missing.err)

    def test_each_profile_is_checked_with_its_own_ca_bundle(self):
        """auth status --all speaks for several profiles: each server is checked with the TLS
        settings of the profile whose session it carries, not the current profile's."""
        tls, ca = self.tls_server()
        self.seed("plain")  # the current profile: http, no CA bundle
        self.seed("lab", api_url=tls.url, ca_bundle=ca, current=False)
        result = self.run_cli("auth", "status", "--all", "-j")
        self.assertEqual(result.code, 0, result)
        report = {entry["profile"]: entry for entry in json.loads(result.out)}
        self.assertEqual(report["lab"]["server"], {"reachable": True, "login": "admin"}, report["lab"])
        self.assertEqual(tls.count("GET", "/auth/me"), 1)
        self.ok("-p", "lab", "auth", "status")
        self.seed("other", api_url=tls.url, current=False)  # the same server, no bundle: not trusted
        result = self.run_cli("-p", "other", "auth", "whoami")
        self.assertEqual(result.code, 5, result)

    def test_insecure_connects_and_warns(self):
        tls, _ = self.tls_server()
        self.seed(api_url=tls.url)
        result = self.ok("--insecure", "auth", "whoami")
        self.assertIn("--insecure", result.err)

    def test_proxies_come_from_the_environment(self):
        token = self.server.mint("admin")
        env = {"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": "http://attune.invalid:8080",
               "HTTP_PROXY": self.server.url}
        self.ok("auth", "whoami", env=env)
        self.assertEqual(self.server.requests[-1].target, "http://attune.invalid:8080/auth/me")
        self.assertEqual(self.server.requests[-1].token, token)
        env["NO_PROXY"] = "localhost,.invalid"
        self.assertIn("cannot resolve", self.fails(5, "auth", "whoami", env=env).err)

    def test_verbose_logs_redact_the_authorization_header_and_token_fields(self):
        self.seed(access_left=-100)
        result = self.ok("-v", "auth", "whoami")
        self.assertIn("> POST %s/auth/refresh" % self.server.url, result.err)
        self.assertIn('{"refresh_token": "***"}', result.err)
        self.assertIn('"access_token": "***"', result.err)
        self.assertIn("> Authorization: Bearer ***", result.err)
        self.assertIn("< 200 OK", result.err)


# === Tests: auth commands ====================================================

class AuthCommandTests(AttuneTestCase):
    def login(self, *extra, stdin=PASSWORD + "\n", env=None):
        return self.run_cli("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                            *extra, stdin=stdin, env=env)

    def test_login_reads_settings_then_logs_in_and_stores_the_session(self):
        before = time.time()
        result = self.login()
        self.assertEqual(result.code, 0, result)
        lines = result.out.splitlines()
        self.assertEqual(lines[0], "✓ Successfully logged in as admin")
        self.assertRegex(lines[1], r"^ℹ Profile 'default' at http://127\.0\.0\.1:\d+; token expires in "
                                   r"(1h|59m 5\ds) \((3600|359\d) seconds\)$")
        self.assertEqual(self.server.log(), ["GET /auth/settings", "POST /auth/login"])
        self.assertEqual(self.server.requests[1].json(), {"login": "admin", "password": PASSWORD})
        doc = self.read_doc()
        self.assertEqual(doc["current_profile"], "default")
        stored = doc["profiles"]["default"]
        self.assertEqual((stored["api_url"], stored["username"], stored["auth_method"]),
                         (self.server.url, "admin", "direct"))
        self.assertIn(stored["auth_token"], self.server.issued)
        self.assertIn(stored["refresh_token"], self.server.issued)
        self.assertGreaterEqual(stored["auth_token_expires_at"], int(before) + 3600)
        self.assertIsNone(stored["invalidated_at"])

    def test_login_json_never_holds_tokens(self):
        result = self.login("-j")
        data = result.json()
        self.assertEqual(sorted(data), ["already_logged_in", "api_url", "expires_at", "expires_in", "profile",
                                        "username"])
        self.assertFalse(data["already_logged_in"])
        self.assertEqual((data["profile"], data["username"]), ("default", "admin"))
        self.assertTrue(3590 <= data["expires_in"] <= 3600, data)  # whole seconds left, on a loaded machine too

    def test_the_first_profile_created_becomes_current(self):
        self.assertEqual(self.login("--save-profile", "prod").code, 0)
        self.assertEqual(self.login("--save-profile", "dev").code, 0)
        doc = self.read_doc()
        self.assertEqual(doc["current_profile"], "prod")
        self.assertEqual(sorted(doc["profiles"]), ["dev", "prod"])

    def test_login_to_a_named_profile_creates_it(self):
        self.assertEqual(self.run_cli("-p", "new", "auth", "login", "-u", "admin", "--password-stdin",
                                      "--url", self.server.url, stdin=PASSWORD).code, 0)
        self.assertIn("new", self.read_doc()["profiles"])

    def test_login_uses_ldap_when_local_passwords_are_off(self):
        self.server.settings.update(local_password_enabled=False, ldap_enabled=True)
        self.ok("auth", "login", "-u", "ldapuser", "--password-stdin", "--url", self.server.url,
                stdin="ldap-pass\n")
        self.assertEqual(self.server.log(), ["GET /auth/settings", "POST /auth/ldap/login"])
        self.assertEqual(self.profile()["auth_method"], "ldap")

    def test_login_falls_back_to_local_login_when_settings_fail(self):
        self.server.fail("/auth/settings", status=500, body={"error": "boom", "code": "INTERNAL_SERVER_ERROR"})
        self.assertEqual(self.login().code, 0)
        self.assertEqual(self.server.log(), ["GET /auth/settings", "POST /auth/login"])

    def test_wrong_password_exits_4_with_the_server_message(self):
        result = self.login(stdin="wrong-password\n")
        self.assertEqual(result.code, 4, result)
        self.assertIn("Invalid login or password", result.err)
        self.assertFalse(os.path.exists(self.config))
        self.extra_secrets = {"wrong-password"}
        self.assert_no_leak(result)

    def test_password_sources(self):
        base = ("auth", "login", "-u", "admin", "--url", self.server.url)
        self.ok(*base, env={"ATTUNE_PASSWORD": PASSWORD})
        result = self.ok(*(base + ("--password", PASSWORD)))
        self.assertIn("process list", result.err)
        result = self.fails(2, *base)
        self.assertIn("--password-stdin", result.err)
        self.assertIn("ATTUNE_PASSWORD", result.err)
        self.fails(2, *(base + ("--password-stdin", "--password", PASSWORD)), stdin=PASSWORD)
        self.fails(2, *(base + ("--password-stdin",)), stdin="")

    def test_username_defaults_to_the_stored_one(self):
        self.assertEqual(self.login().code, 0)
        self.ok("auth", "login", "--password-stdin", stdin=PASSWORD)
        self.assertEqual(self.server.requests[-1].json()["login"], "admin")
        result = self.fails(2, "auth", "login", "--save-profile", "fresh", "--password-stdin", stdin=PASSWORD)
        self.assertIn("-u/--username", result.err)

    @unittest.skipUnless(POSIX, "pseudo-terminals")
    def test_prompts_for_username_and_password_on_a_terminal(self):
        import pty
        master, slave = pty.openpty()
        # a new session has no controlling terminal, so getpass falls back to our pty
        p = subprocess.Popen(attune_argv() + ["auth", "login", "--url", self.server.url],
                             env=self.process_env(), stdin=slave, stderr=slave, stdout=subprocess.PIPE,
                             start_new_session=True, universal_newlines=True)
        os.close(slave)
        seen = b""
        for prompt, answer in ((b"Username: ", b"admin\n"), (b"Password: ", PASSWORD.encode() + b"\n")):
            while prompt not in seen:
                seen += os.read(master, 1024)
            os.write(master, answer)
        out = p.communicate(timeout=60)[0]
        os.close(master)
        self.assertEqual(p.returncode, 0)
        self.assertIn("Successfully logged in as admin", out)
        self.assertEqual(self.server.requests[-1].json(), {"login": "admin", "password": PASSWORD})

    def test_a_login_into_a_new_profile_keeps_an_existing_default_current(self):
        self.ok("config", "set", "description", "local")  # the file now holds 'default'
        self.assertEqual(self.login("--save-profile", "prod").code, 0)
        self.assertIsNone(self.read_doc().get("current_profile"))
        self.assertEqual(self.ok("config", "current").out, "default\n")

    def test_login_warns_when_an_environment_token_takes_precedence(self):
        result = self.login(env={"ATTUNE_API_TOKEN": "x"})
        self.assertIn("ATTUNE_API_TOKEN is set and takes precedence", result.err)

    def test_token_login(self):
        self.ok("auth", "token-login", "--token-stdin", "--url", self.server.url, stdin="attune_it_testtoken\n")
        self.assertEqual(self.server.requests[-1].json(), {"token": "attune_it_testtoken"})
        self.assertEqual((self.profile()["auth_method"], self.profile()["username"]), ("token", "admin"))
        result = self.fails(4, "auth", "token-login", "--token-stdin", stdin="attune_it_wrong\n")
        self.assertIn("Invalid token", result.err)
        self.assertIn("process list", self.ok("auth", "token-login", "--token", "attune_it_testtoken").err)
        self.fails(2, "auth", "token-login")

    def test_logout_forgets_tokens_and_keeps_the_rest(self):
        self.seed(team_note="keep")
        result = self.ok("auth", "logout")
        self.assertEqual(result.out, "✓ Successfully logged out (profile 'default')\n")
        stored = self.profile()
        for key in attune.TOKEN_KEYS:
            self.assertNotIn(key, stored)
        self.assertEqual((stored["api_url"], stored["team_note"]), (self.server.url, "keep"))
        self.assertEqual(self.server.count(), 0)
        self.assertEqual(self.ok("auth", "logout", "-j").json()["message"], "Successfully logged out")

    def test_logout_all(self):
        self.seed("a")
        self.seed("b")
        self.ok("auth", "logout", "--all")
        self.assertFalse(any("auth_token" in p for p in self.read_doc()["profiles"].values()))

    def test_logout_without_a_file_creates_nothing(self):
        self.ok("auth", "logout")
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_whoami(self):
        self.seed()
        out = self.ok("auth", "whoami").out
        self.assertEqual(out.splitlines(), [
            "Current Identity", "────────────────", "Login:         admin",
            "Display Name:  Administrator", "API Host:      " + self.server.url, "ID:            1"])
        data = self.ok("auth", "whoami", "-j").json()
        self.assertEqual(data, {"id": 1, "login": "admin", "display_name": "Administrator"})

    def test_whoami_when_not_logged_in_exits_4_without_network(self):
        result = self.fails(4, "auth", "whoami", env={"ATTUNE_API_URL": self.server.url})
        self.assertEqual(result.err, "attune: error: Not logged in. Use 'attune auth login'\n")
        self.assertEqual(self.server.count(), 0)

    def test_status_offline_and_online(self):
        self.seed()
        offline = self.ok("auth", "status", "--offline")
        self.assertEqual(self.server.count(), 0)
        self.assertIn("Profile: default (current)", offline.out)
        self.assertIn("Token source:   credential file, profile 'default'", offline.out)
        self.assertRegex(offline.out, r"Access token:\s+expires in 4\dm")
        self.assertRegex(offline.out, r"Refresh token:\s+expires in 5d 23h")
        self.assertIn("Status:         logged in", offline.out)
        online = self.ok("auth", "status")
        self.assertIn("Server:         ok, logged in as admin", online.out)
        self.assertEqual(self.server.log(), ["GET /auth/me"])

    def test_status_exit_codes(self):
        self.fails(4, "auth", "status", env={"ATTUNE_API_URL": self.server.url})
        self.seed(access_left=-100)
        self.ok("auth", "status", "--offline")  # a usable refresh token is enough
        self.ok("auth", "status")
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/me"])
        self.seed(api_url="http://127.0.0.1:%d" % free_port())  # its server is down
        self.fails(5, "auth", "status")
        self.seed(access_left=-100, invalidated_at=int(time.time()))
        self.fails(4, "auth", "status", "--offline")
        self.seed(access_left=-100, refresh_left=-1)
        self.fails(4, "auth", "status")

    def test_status_all_covers_every_profile(self):
        self.seed("a")
        self.seed("b", access_left=-100, refresh_left=-1, current=False)
        result = self.fails(4, "auth", "status", "--all", "--offline", "-j")
        data = {s["profile"]: s for s in result.json()}
        self.assertEqual(sorted(data), ["a", "b"])  # the implicit default has nothing to report
        self.assertEqual([data[n]["logged_in"] for n in ("a", "b")], [True, False])
        self.assertTrue(data["a"]["current"])

    def test_current_is_the_files_current_profile_not_the_one_p_picks(self):
        self.seed()
        self.seed("staging", current=False)
        out = self.ok("-p", "staging", "auth", "status", "--offline").out
        self.assertTrue(out.startswith("Profile: staging\n"), out)
        self.assertFalse(self.ok("-p", "staging", "auth", "status", "--offline", "-j").json()["current"])
        self.assertTrue(self.ok("auth", "status", "--offline").out.startswith("Profile: default (current)\n"))

    def test_status_json_says_where_values_came_from(self):
        self.seed()
        data = self.ok("auth", "status", "-j", "--offline", env={"ATTUNE_API_URL": self.server.url}).json()
        self.assertEqual((data["api_url_source"], data["token_source"], data["token_origin"]),
                         ("env", "file", "default"))
        self.assertGreater(data["access_token_expires_in"], 2900)

    def test_refresh_prints_the_new_lifetime(self):
        old = self.seed()
        result = self.ok("auth", "refresh")
        self.assertEqual(result.out.splitlines()[0], "✓ Token refreshed successfully")
        self.assertRegex(result.out.splitlines()[1], r"^ℹ New token expires in 3(600|59\d) seconds$")
        self.assertNotEqual(self.profile()["refresh_token"], old["refresh_token"])
        self.assertEqual(self.server.log(), ["POST /auth/refresh"])

    def test_refresh_without_a_refresh_token_exits_4(self):
        self.seed(refresh_token=None)
        self.assertIn("no refresh token", self.fails(4, "auth", "refresh").err)

    def test_token_formats(self):
        token = self.seed()["auth_token"]
        run = lambda *a: self.ok("auth", "token", *a, secrets_ok=True)  # noqa: E731
        self.assertEqual(run().out, token + "\n")
        self.assertEqual(run("--format", "header").out, "Authorization: Bearer %s\n" % token)
        self.assertEqual(run("--format", "env").out,
                         "export ATTUNE_API_URL=%s\nexport ATTUNE_API_TOKEN=%s\n" % (self.server.url, token))
        data = run("--format", "json").json()
        self.assertEqual(sorted(data), ["api_url", "api_url_source", "expires_at", "expires_in", "profile",
                                        "profile_source", "source", "source_detail", "token"])
        self.assertEqual((data["token"], data["profile"], data["api_url"], data["source"]),
                         (token, "default", self.server.url, "file"))
        self.assertEqual(run("-j").json()["token"], token)
        self.assertEqual(self.server.count(), 0)

    def test_token_env_format_is_shell_quoted(self):
        token = self.server.mint("admin")
        url = "http://127.0.0.1:1/it's-$HOME-`here`"
        out = self.ok("auth", "token", "--format", "env", env={"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": url},
                      secrets_ok=True).out
        shell = subprocess.Popen(["sh", "-c", 'eval "$(cat)"; printf "%s|%s" "$ATTUNE_API_URL" "$ATTUNE_API_TOKEN"'],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(shell.communicate(out)[0], url + "|" + token)

    def test_token_min_ttl_refreshes_first(self):
        self.seed(access_left=3000)
        result = self.ok("auth", "token", "--min-ttl", "3500", secrets_ok=True)
        self.assertEqual(self.server.log(), ["POST /auth/refresh"])
        self.assertEqual(result.out, self.profile()["auth_token"] + "\n")
        self.ok("auth", "token", "--min-ttl", "600", secrets_ok=True)
        self.assertEqual(self.server.count(), 1)

    def test_token_prints_nothing_unless_it_succeeds(self):
        result = self.fails(4, "auth", "token", env={"ATTUNE_API_URL": self.server.url})
        self.assertEqual(result.out, "")
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", status=401, body={"error": "Invalid", "code": "UNAUTHORIZED"})
        self.assertEqual(self.fails(4, "auth", "token").out, "")

    def test_token_min_ttl_that_cannot_be_met_exits_4(self):
        token = self.server.mint("admin", ttl=600)
        result = self.fails(4, "auth", "token", "--min-ttl", "900",
                            env={"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": self.server.url})
        self.assertIn("less than --min-ttl", result.err)
        self.assertEqual(result.out, "")


# === Tests: config commands ==================================================

class ConfigCommandTests(AttuneTestCase):
    def test_get_shows_the_tokens_masked_and_set_refuses_them(self):
        self.seed()
        self.seed("empty", current=False, auth_token=None, refresh_token=None)
        for key in ("auth_token", "refresh_token"):
            self.assertEqual(self.ok("config", "get", key).out, "***\n")
            self.assertEqual(self.ok("config", "get", key, "-j").json(), {"key": key, "value": "***"})
            self.assertEqual(self.ok("-p", "empty", "config", "get", key).out, "(not set)\n")
            self.assertEqual(self.ok("-p", "empty", "config", "get", key, "-j").json(), {"key": key, "value": None})
            self.assertIn("set by logging in", self.fails(2, "config", "set", key, "x").err)
        self.assertIn("auth_token, refresh_token", self.fails(2, "config", "get", "nope").err)
        self.assertNotIn("auth_token", self.fails(2, "config", "set", "nope", "x").err)

    def test_profiles_lifecycle(self):
        result = self.ok("config", "add-profile", "staging", "--api-url", "https://staging.example.com/",
                         "--description", "Staging environment")
        self.assertEqual(result.out, "✓ Profile 'staging' added\n")
        self.assertEqual(self.profile("staging"),
                         {"api_url": "https://staging.example.com", "description": "Staging environment"})
        table = self.ok("config", "profiles").out.splitlines()
        self.assertRegex(table[2], r"^\*\s+default\s+http://localhost:8080")
        self.assertRegex(table[3], r"^\s+staging\s+https://staging\.example\.com\s+Staging environment$")
        self.assertEqual(self.ok("config", "use", "staging").out, "✓ Switched to profile 'staging'\n")
        self.assertEqual(self.ok("config", "current").out, "staging\n")
        self.assertEqual(self.ok("config", "current", "-p", "default").out, "default\n")
        shown = self.ok("config", "show-profile", "staging").out
        self.assertIn("API URL:", shown)
        self.assertIn("https://staging.example.com", shown)
        result = self.fails(1, "config", "remove-profile", "staging")
        self.assertIn("Cannot remove active profile 'staging'", result.err)
        self.ok("config", "use", "default")
        self.assertEqual(self.ok("config", "remove-profile", "staging").out, "✓ Profile 'staging' removed\n")
        self.fails(1, "config", "remove-profile", "default")
        self.fails(3, "config", "use", "nope")
        self.fails(3, "config", "remove-profile", "nope")
        self.fails(3, "config", "show-profile", "nope")

    def test_add_profile_updates_and_keeps_tokens_for_the_same_server(self):
        self.seed()
        result = self.ok("config", "add-profile", "default", "--api-url", self.server.url + "/", "--description",
                         "d", "-j")
        self.assertEqual(result.json()["auth_token"], "***")
        self.assertEqual(self.profile()["description"], "d")
        self.assertIn("auth_token", self.profile())
        self.ok("config", "add-profile", "default", "--api-url", "http://new.invalid")
        self.assertEqual(self.profile()["api_url"], "http://new.invalid")
        self.assertNotIn("auth_token", self.profile())  # that session was another server's
        self.fails(2, "config", "add-profile", "x")
        self.fails(3, "config", "add-profile", "x", "--api-url", "ftp://x")

    def test_get_and_set(self):
        self.ok("config", "set", "api_url", "http://x.invalid")
        self.assertEqual(self.ok("config", "get", "api_url").out, "http://x.invalid\n")
        self.ok("config", "set", "output_format", "YAML")
        self.assertEqual(self.ok("config", "get", "format", "--output", "table").out, "yaml\n")
        self.assertEqual(self.read_doc()["format"], "yaml")
        self.assertIn("format must be one of", self.fails(2, "config", "set", "format", "xml").err)
        self.fails(3, "config", "set", "profile", "nope")
        self.ok("config", "add-profile", "p", "--api-url", "http://p.invalid")
        self.ok("config", "set", "current_profile", "p")
        self.assertEqual(self.read_doc()["current_profile"], "p")
        self.ok("config", "set", "description", "hello")
        self.assertEqual(self.ok("config", "get", "description", "-j").json(),
                         {"key": "description", "value": "hello"})
        self.ok("config", "set", "description", "")
        self.assertNotIn("description", self.profile("p"))
        self.assertIn("unknown key", self.fails(2, "config", "get", "colour").err)
        self.fails(3, "config", "set", "api_url", "not-a-url")

    def test_list_and_show_profile_mask_tokens(self):
        self.seed()
        data = self.ok("config", "list", "-j").json()
        self.assertEqual((data["auth_token"], data["refresh_token"], data["api_url"]),
                         ("***", "***", self.server.url))
        listed = self.ok("config", "list").out
        self.assertRegex(listed, r"auth_token:\s+\*\*\*\n")
        self.assertRegex(listed, r"ca_bundle:\s+\(not set\)\n")
        shown = self.ok("config", "show-profile", "default", "-j").json()
        self.assertEqual((shown["auth_token"], shown["refresh_token"]), ("***", "***"))
        self.assertIn("Auth Token:", self.ok("config", "show-profile", "default").out)

    def test_path(self):
        self.assertEqual(self.ok("config", "path").out, self.config + "\n")
        self.assertEqual(self.ok("config", "path", "-j").json()["source"], "env")


# === Tests: output and encodings =============================================

class OutputTests(AttuneTestCase):
    def test_json_is_pretty_printed_with_two_spaces(self):
        self.seed()
        out = self.ok("auth", "whoami", "-j").out
        self.assertTrue(out.startswith('{\n  "id": 1,\n  "login": "admin",'), out)

    def test_a_table_into_a_pipe_is_whole_whatever_columns_says(self):
        self.seed()
        self.ok("config", "add-profile", "wide", "--api-url", "http://x.invalid", "--description", "d" * 200)
        out = self.run_process("config", "profiles", env={"COLUMNS": "60"}).out
        self.assertIn("d" * 200, out)
        self.assertNotIn(attune.ELLIPSIS, out)

    @unittest.skipUnless(POSIX, "pseudo-terminals")
    def test_a_table_on_a_terminal_fits_its_width(self):
        """The terminal's own width wins; COLUMNS stands in when the terminal reports none."""
        import pty
        import termios
        import fcntl
        self.seed()
        self.ok("config", "add-profile", "wide", "--api-url", "http://x.invalid", "--description", "d" * 200)
        for size, env, width in (((24, 60), {"COLUMNS": "100"}, 60), ((0, 0), {"COLUMNS": "50"}, 50)):
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
            attrs = termios.tcgetattr(slave)
            attrs[1] &= ~termios.OPOST  # the lines as written, without \r
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            p = subprocess.Popen(attune_argv() + ["config", "profiles"], env=self.process_env(env),
                                 stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
            os.close(slave)
            out = read_terminal(master)
            self.assertEqual(p.wait(timeout=60), 0)
            p.stderr.close()
            lines = out.decode("utf-8").splitlines()
            self.assertIn(attune.ELLIPSIS, out.decode("utf-8"))
            for line in lines:
                self.assertLessEqual(len(line), width, line)

    def test_ascii_stdout_gets_plain_symbols(self):
        result = self.run_process("config", "use", "default", env={"PYTHONIOENCODING": "ascii"})
        self.assertEqual((result.code, result.out), (0, "OK Switched to profile 'default'\n"), result)

    def test_lang_c_with_non_ascii_data_never_crashes(self):
        self.seed(user="zoe")
        env = {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": None, "PYTHONUTF8": None}
        table = self.run_process("auth", "whoami", env=env)
        self.assertEqual(table.code, 0, table)
        self.assertIn("Zo", table.out)
        as_json = self.run_process("auth", "whoami", "-j", env=env)
        self.assertEqual(json.loads(as_json.out)["display_name"], "Zoë Ørsted")
        as_yaml = self.run_process("auth", "whoami", "-y", env=env)
        self.assertEqual(as_yaml.code, 0, as_yaml)
        self.assertIn("display_name:", as_yaml.out)

    @unittest.skipUnless(POSIX, "pipes")
    def test_a_closed_stdout_is_quiet(self):
        self.seed()
        for i in range(30):
            self.ok("config", "add-profile", "p%02d" % i, "--api-url", "http://p.invalid")
        p = self.spawn("config", "profiles")
        p.stdout.close()
        with p.stderr:
            err = p.stderr.read()
        self.assertEqual((p.wait(), err), (0, ""))


# === Tests: exit codes and real processes ====================================

class ExitCodeTests(AttuneTestCase):
    def test_every_exit_code(self):
        self.assertEqual(self.run_cli("config", "path").code, 0)
        self.seed()
        self.server.fail("/auth/me", status=404, body={"error": "gone", "code": "NOT_FOUND"})
        self.assertEqual(self.run_cli("auth", "whoami").code, 1)
        self.assertEqual(self.run_cli("auth", "frobnicate").code, 2)
        self.assertEqual(self.run_cli("-p", "nope", "auth", "whoami").code, 3)
        self.assertEqual(self.run_cli("auth", "whoami", env={"ATTUNE_CONFIG": self.config + ".none",
                                                             "ATTUNE_API_URL": self.server.url}).code, 4)
        self.assertEqual(self.run_cli("auth", "whoami", "--api-url", "http://127.0.0.1:%d" % free_port(),
                                      env={"ATTUNE_API_TOKEN": self.profile()["auth_token"]}).code, 5)
        self.assertEqual(self.run_cli("auth", "whoami", "--api-url", "http://127.0.0.1:%d" % free_port()).code,
                         4)  # the stored session is another origin's
        self.server.fail("/auth/me", status=503, times=None, body={"error": "down", "code": "X"})
        self.assertEqual(self.run_cli("auth", "whoami").code, 6)

    def test_help_and_version(self):
        result = self.ok("--help")
        for code, meaning in attune.EXIT_CODES:
            self.assertIn("%-4d %s" % (code, meaning), result.out)
        for name, _ in attune.ENVIRONMENT:
            self.assertIn(name, result.out)
        self.assertEqual(self.ok("--version").out, "attune.py %s (python %d.%d)\n"
                         % ((attune.__version__,) + tuple(sys.version_info[:2])))
        self.assertIn("--password-stdin", self.ok("auth", "login", "--help").out)


class ProcessTests(AttuneTestCase):
    """Real processes, for what only real processes show: locks, signals, kills."""
    server_options = {"refresh_mode": "single-use"}

    def test_32_processes_with_an_expired_token_refresh_exactly_once(self):
        self.seed(access_left=-100)
        procs = [self.spawn("auth", "whoami", "-j") for _ in range(32)]
        results = [(p.communicate(timeout=120), p.returncode) for p in procs]
        for (out, err), code in results:
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out)["login"], "admin")
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 1)
        self.assertEqual(self.server.count("GET", "/auth/me"), 32)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
        self.assertIsNone(self.read_doc()["profiles"]["default"]["invalidated_at"])

    def test_request_counts_valid_expired_revoked(self):
        self.seed()
        self.assertEqual(self.run_process("auth", "whoami").code, 0)
        self.assertEqual(self.server.count(), 1)
        self.seed(access_left=-100)
        self.assertEqual(self.run_process("auth", "whoami").code, 0)
        self.assertEqual(self.server.count(), 3)
        self.server.revoked.add(self.profile()["auth_token"])
        self.assertEqual(self.run_process("auth", "whoami").code, 0)
        self.assertEqual(self.server.count(), 6)
        self.assertEqual(self.server.log()[3:], ["GET /auth/me", "POST /auth/refresh", "GET /auth/me"])

    def test_a_writer_killed_mid_write_never_leaves_a_corrupt_file(self):
        writer = ("import os, sys, attune\n"
                  "store = attune.CredentialStore(sys.argv[1], print, print)\n"
                  "blob = 'x' * 300000\n"
                  "for i in range(100000):\n"
                  "    store.modify(lambda d: d['profiles'].__setitem__('p', {'api_url': 'http://x', 'n': i,"
                  " 'pid': os.getpid(), 'blob': blob}))\n")
        self.seed()
        rng = random.Random(7)
        for _ in range(12):
            p = subprocess.Popen([sys.executable, "-c", writer, self.config], cwd=HERE,
                                 stdout=subprocess.DEVNULL)
            self.wait_for_writes([p])
            time.sleep(rng.uniform(0.0, 0.05))
            p.kill()
            self.assertEqual(p.wait(), -signal.SIGKILL)  # killed while writing, not finished
            doc = self.read_doc()  # parses
            self.assertIn("default", doc["profiles"])
        self.assertEqual(self.run_process("auth", "whoami").code, 0)

    @unittest.skipUnless(POSIX, "signals")
    def test_sigint_during_a_refresh_exits_130_releases_the_lock_and_keeps_the_file(self):
        self.seed(access_left=-100)
        before = self.snapshot()
        self.server.fail("/auth/refresh", delay=5)
        p = self.spawn("auth", "whoami")
        deadline = time.monotonic() + 30
        while self.server.count("POST", "/auth/refresh") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 130, err)
        self.assertIn("interrupted", err)
        self.assertNotIn("Traceback", err)
        import fcntl
        with open(self.config + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        self.assertEqual(self.snapshot()[0], before[0])

    def test_exit_codes_of_real_processes(self):
        """The copied script itself (every other process test loads the bytecode cache)."""
        self.assertEqual(self.run_process("nonsense", script=True).code, 2)
        self.assertEqual(self.run_process("-p", "nope", "auth", "status", script=True).code, 3)
        self.assertEqual(self.run_process("auth", "whoami", env={"ATTUNE_API_URL": self.server.url},
                                          script=True).code, 4)
        self.assertEqual(self.run_process("config", "path", script=True).code, 0)

    def test_auth_token_with_a_fresh_token_does_not_import_the_http_stack(self):
        token = self.seed()["auth_token"]
        probe = ("import sys\n"
                 "before = set(sys.modules)  # site hooks may import things before us\n"
                 "import attune\n"
                 "code = attune.main(['auth', 'token'])\n"
                 "heavy = [m for m in ('urllib', 'urllib.request', 'http', 'http.client', 'ssl', 'email',"
                 " 'socket') if m in sys.modules and m not in before]\n"
                 "print('imported:', ' '.join(heavy))\n"
                 "sys.exit(code)\n")
        p = subprocess.Popen([sys.executable, "-c", probe], cwd=HERE, env=self.process_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 0, err)
        self.assertEqual(out, token + "\nimported: \n")


class GuardTests(unittest.TestCase):
    STDLIB = {"argparse", "binascii", "codecs", "difflib", "email", "errno", "fcntl", "getpass", "hashlib", "http", "importlib",
              "io", "ipaddress", "json", "logging", "msvcrt", "os", "py_compile", "re", "select", "shlex", "shutil", "signal",
              "socket", "ssl", "stat", "struct", "subprocess", "sys", "tarfile", "tempfile", "termios", "time",
              "urllib", "warnings", "webbrowser", "datetime"}

    def tree(self):
        import ast
        with open(ATTUNE_PY, encoding="utf-8") as f:
            return ast.parse(f.read())

    def test_the_table_of_contents(self):
        """Every section banner has one style and width, and every class is defined above
        the first line that names it: the file reads from top to bottom."""
        import ast
        with open(ATTUNE_PY, encoding="utf-8") as f:
            lines = f.read().split("\n")
        banners = [line for line in lines if line.startswith("# ===")]
        self.assertGreaterEqual(len(banners), 30)
        for line in banners:
            self.assertRegex(line, r"^# === [^=]+ =+$")
            self.assertEqual(len(line), 79, line)
        self.assertEqual([line for line in lines if line.startswith("# ---")], [])  # no half-sections
        tree = self.tree()
        classes = {node.name: node.lineno for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in classes:
                self.assertGreater(node.lineno, classes[node.id], "%s is named before it is defined" % node.id)

    def test_each_command_group_is_one_section_with_its_helpers(self):
        """Every command of a group is declared in the group's own section (auth token alone
        has one of its own: the quick path), so the file reads as --help lists the groups
        (that order is the order of declaration). A helper written in a group's section is
        used there; one in the shared section is used by two groups at least."""
        import ast
        with open(ATTUNE_PY, encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        section_of, section, homes = [], "", {}
        for line in lines:
            if line.startswith("# === "):
                section = line
            section_of.append(section)
            found = re.match(r'(?:group\(|@command\()"([a-z-]+)', line)
            if found:
                homes.setdefault(found.group(1), set()).add(section)
        for name, sections in homes.items():
            self.assertEqual(len(sections), 2 if name == "auth" else 1, (name, sorted(sections)))
        defined, users = {}, {}
        for node in ast.parse(text).body:
            names = [node.name] if hasattr(node, "name") else \
                [t.id for t in getattr(node, "targets", ()) if isinstance(t, ast.Name)]
            for name in names:
                defined.setdefault(name, section_of[node.lineno - 1])  # where it is first written
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id not in names:
                    users.setdefault(sub.id, set()).add(section_of[node.lineno - 1])
        for name, home in defined.items():
            used = users.get(name, set())
            if home.startswith("# === Commands: ") and used:
                self.assertIn(home, used, "%s is written in %s but used only in %s" % (name, home, sorted(used)))
            if home.startswith("# === Shared by the commands"):
                self.assertGreaterEqual(len(used - {home}), 2, "%s is shared but used by %s" % (name, sorted(used)))

    def test_attune_imports_only_the_standard_library(self):
        import ast
        imported = set()
        for node in ast.walk(self.tree()):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
        self.assertLessEqual(imported, self.STDLIB)
        names = getattr(sys, "stdlib_module_names", None)
        if names:
            self.assertLessEqual(imported, set(names) | {"msvcrt", "fcntl"})

    def test_plain_code_only(self):
        """No code in strings, nothing run from text, no private interpreter API."""
        import ast
        modules = {"argparse", "json", "os", "sys", "urllib", "http", "ssl", "socket", "time", "binascii"}
        longest = 0
        for node in ast.walk(self.tree()):
            if isinstance(node, ast.Name):
                self.assertNotIn(node.id, ("exec", "eval", "compile"), node.lineno)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                documented = (node.value.id, node.attr) == ("os", "_exit")  # public, in the os docs
                self.assertFalse(private and not documented and node.value.id in modules,
                                 "%s.%s" % (node.value.id, node.attr))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                self.assertFalse([n for n in names if n in ("marshal", "_json") or n.startswith("_json")], names)
            elif type(node).__name__ in ("Str", "Constant"):  # Str before 3.8
                text = node.s if type(node).__name__ == "Str" else node.value
                longest = max(longest, len(text) if isinstance(text, str) else 0)
        self.assertLess(longest, 2000)  # help texts and scripts, not programs

    def test_the_python_3_6_grammar_is_enough(self):
        import ast
        for path in (ATTUNE_PY, os.path.join(HERE, "test_attune.py")):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            try:
                ast.parse(source, feature_version=(3, 6))
            except TypeError:  # feature_version is 3.8+; older interpreters compile it for real
                compile(source, path, "exec")

    def test_importing_attune_does_nothing(self):
        p = subprocess.Popen([sys.executable, "-c", "import attune"], cwd=HERE, env={"PATH": "/usr/bin:/bin"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(p.communicate(timeout=60), (b"", b""))


class SandboxTests(unittest.TestCase):
    def test_a_taken_port_is_one_line_with_what_to_do(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "serve", "--port", str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
        self.assertEqual((p.returncode, p.stdout), (1, ""))
        self.assertEqual(p.stderr.splitlines(), [
            "test_attune.py serve: cannot listen on 127.0.0.1:%d: Address already in use; another program uses it "
            "(the sandbox already running?): choose another with --port N, or --port 0 for any free one" % port])

    def test_serve_runs_the_sandbox(self):
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", "--port", "0"],
                             stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(p.stdout.close)
        self.addCleanup(p.wait)
        self.addCleanup(p.terminate)
        url = re.search(r"http://\S+", p.stdout.readline()).group(0)
        from urllib.request import urlopen
        with urlopen(url + "/health", timeout=10) as r:
            self.assertEqual(json.loads(r.read().decode()), {"status": "ok"})
        tmp = tempfile.mkdtemp(prefix="attune-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        env = {"HOME": tmp, "ATTUNE_CONFIG": os.path.join(tmp, "c.json"), "PATH": "/usr/bin:/bin"}
        login = subprocess.Popen([sys.executable, ATTUNE_PY, "auth", "login", "-u", "admin", "--password-stdin",
                                  "--url", url], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 universal_newlines=True)
        self.assertIn("Successfully logged in as admin", login.communicate("admin\n", timeout=60)[0])
        self.assertEqual(login.returncode, 0)


class InstallTests(AttuneTestCase):
    """self-install (and make install): the compiled module behind an isolated launcher."""

    def install(self, *extra):
        prefix = os.path.join(self.tmp, "prefix")
        result = self.run_process("self-install", "--prefix", prefix, *extra)
        self.assertEqual(result.code, 0, result)
        return prefix

    def test_installed_attune_behaves_like_the_file_and_ignores_the_environment_python_reads(self):
        token = self.seed()["auth_token"]
        prefix = self.install()
        launcher = os.path.join(prefix, "bin", "attune")
        module = os.path.join(prefix, "lib", "attune", "attune.py")
        with open(launcher) as f:
            first = f.readline()
        self.assertEqual(first, "#!%s -IS\n" % os.path.abspath(sys.executable))
        self.assertEqual(stat.S_IMODE(os.stat(launcher).st_mode), 0o755)
        self.assertTrue(os.path.exists(importlib_cache(module)), os.listdir(os.path.dirname(module)))
        # a planted attune.py and sitecustomize on PYTHONPATH must not run inside the launcher
        planted = os.path.join(self.tmp, "planted")
        os.makedirs(planted)
        for name in ("attune.py", "sitecustomize.py"):
            with open(os.path.join(planted, name), "w") as f:
                f.write("import sys\nsys.stdout.write('PLANTED\\n')\nsys.exit(9)\n")
        env = self.process_env({"PYTHONPATH": planted, "PYTHONDONTWRITEBYTECODE": "1"})
        for argv, expected in ((["auth", "token"], token + "\n"), (["--version"], None), (["config", "path"], None)):
            p = subprocess.Popen([launcher] + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
            out, err = p.communicate(timeout=60)
            direct = self.run_process(*argv, secrets_ok=True)
            self.assertEqual((p.returncode, out, err), (direct.code, direct.out, direct.err), argv)
            self.assertNotIn("PLANTED", out + err)
            if expected:
                self.assertEqual(out, expected)
        uninstall = self.run_process("self-uninstall", "--prefix", prefix)
        self.assertEqual(uninstall.code, 0, uninstall)
        self.assertEqual(sorted(os.listdir(prefix)), ["bin", "lib"])
        self.assertEqual(os.listdir(os.path.join(prefix, "bin")) + os.listdir(os.path.join(prefix, "lib")), [])

    def test_the_installed_halves(self):
        """auth token and --version load the first half only; every other command loads the
        rest; the halves put together are this file, and an installed attune installs again."""
        token = self.seed()["auth_token"]
        prefix = self.install()
        libdir = os.path.join(prefix, "lib", "attune")
        launcher = [os.path.join(prefix, "bin", "attune")]
        first, rest = (os.path.join(libdir, name) for name in ("attune.py", "attune_rest.py"))
        with open(ATTUNE_PY, encoding="utf-8") as f:
            whole = f.read()
        with open(first, encoding="utf-8") as f, open(rest, encoding="utf-8") as g:
            halves = f.read(), g.read()
        self.assertEqual(halves[0] + halves[1].lstrip("\n"), whole)
        self.assertEqual(len(halves[1]) - len(halves[1].lstrip("\n")), halves[0].count("\n"))  # same line numbers
        self.assertTrue(halves[1].lstrip("\n").startswith(attune.REST_MARK))
        self.assertIn("\ndef cmd_auth_token(", halves[0])
        self.assertIn("\ndef cmd_pack_list(", halves[1])
        self.assertTrue(os.path.exists(importlib_cache(rest)))
        env = self.process_env({})
        run = lambda *argv: subprocess.run(launcher + list(argv), env=env, stdout=subprocess.PIPE,  # noqa: E731
                                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(run("pack", "list", "-j").returncode, 0)
        # without the second half, the first still gives the token (and --version), and nothing else
        os.rename(rest, rest + ".away")
        os.remove(importlib_cache(rest))
        self.assertEqual(run("auth", "token").stdout, token + "\n")
        self.assertEqual(run("auth", "token", "--format", "header").stdout, "Authorization: Bearer %s\n" % token)
        self.assertEqual(run("--version").returncode, 0)
        for argv in (["auth", "whoami"], ["pack", "list"], ["--help"]):
            result = run(*argv)
            self.assertEqual(result.returncode, 3)
            self.assertEqual(result.stderr, "attune: error: this installation is incomplete: cannot read %r (No such "
                                            "file or directory); install it again\n" % rest)
        os.rename(rest + ".away", rest)
        again = os.path.join(self.tmp, "again")
        result = run("self-install", "--prefix", again)
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in ("attune.py", "attune_rest.py"):
            with open(os.path.join(libdir, name), "rb") as f, open(os.path.join(again, "lib", "attune", name), "rb") as g:
                self.assertEqual(f.read(), g.read(), name)
        self.assertEqual(run("self-uninstall", "--prefix", again).returncode, 0)
        self.assertEqual(os.listdir(os.path.join(again, "lib")), [])

    def test_destdir_stages_files_that_name_the_final_place(self):
        stage = os.path.join(self.tmp, "stage")
        result = self.run_process("self-install", "--prefix", "/opt/attune-test", "--destdir", stage)
        self.assertEqual(result.code, 0, result)
        with open(os.path.join(stage, "opt", "attune-test", "bin", "attune")) as f:
            self.assertIn("sys.path.insert(0, '/opt/attune-test/lib/attune')", f.read())
        self.assertTrue(os.path.exists(os.path.join(stage, "opt", "attune-test", "lib", "attune", "attune.py")))
        self.assertEqual(self.run_process("self-install", "--prefix", "relative").code, 2)

    def test_uninstall_leaves_a_launcher_it_did_not_write(self):
        prefix = os.path.join(self.tmp, "prefix")
        os.makedirs(os.path.join(prefix, "bin"))
        other = os.path.join(prefix, "bin", "attune")
        with open(other, "w") as f:
            f.write("#!/bin/sh\necho someone else's attune\n")
        self.assertEqual(self.run_process("self-uninstall", "--prefix", prefix).code, 0)
        self.assertTrue(os.path.exists(other))

    @unittest.skipUnless(shutil.which("make"), "make")
    def test_make_install_and_uninstall(self):
        stage = os.path.join(self.tmp, "stage")
        args = ["make", "-s", "-C", HERE, "PYTHON=" + sys.executable, "PREFIX=/usr", "DESTDIR=" + stage]
        subprocess.check_call(args + ["install"], stdout=subprocess.DEVNULL)
        self.assertTrue(os.path.exists(os.path.join(stage, "usr", "bin", "attune")))
        subprocess.check_call(args + ["uninstall"], stdout=subprocess.DEVNULL)
        self.assertFalse(os.path.exists(os.path.join(stage, "usr", "bin", "attune")))


def seam_violations(text):
    """(where, name) for each name the part of text above attune.py's seam refers to that
    only the part below defines, found with the symbol table: a local of the same name is
    not a reference; module level is '(module)', a method 'Class.method'."""
    import ast
    import symtable
    first, rest = attune.split_program(text)

    def defined(source):
        names = set()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        return names

    below_only = defined(rest) - defined(first)
    found = []

    def walk(table, where):
        module = table.get_type() == "module"
        for sym in table.get_symbols():
            if sym.get_name() in below_only and sym.is_referenced() and (module or sym.is_global()):
                found.append((where or "(module)", sym.get_name()))
        for child in table.get_children():
            walk(child, (where + "." if where else "") + child.get_name())
    walk(symtable.symtable(first, ATTUNE_PY, "exec"), "")
    return found


class SeamTests(AttuneTestCase):
    """The installed form runs the first half alone for `auth token` and --version: nothing
    there may name what only the rest defines (it would be a NameError only there), and
    `auth token` works in every token state with the rest gone."""

    @unittest.skipUnless(sys.implementation.name == "cpython", "the symtable module (PyPy has none)")
    def test_nothing_above_the_seam_names_what_only_the_rest_defines(self):
        with open(ATTUNE_PY, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(seam_violations(text), [])
        marker = '\n@command("auth token", '  # in the first half
        plants = [("def planted():\n    return emit_list\n", [("planted", "emit_list")]),
                  ("class Planted:\n    def look(self):\n        return confirm()\n", [("Planted.look", "confirm")]),
                  ("def planted():\n    def inner():\n        return emit_list\n    return inner\n",
                   [("planted.inner", "emit_list")]),
                  ("PLANTED = [cmd_pack_list]\n", [("(module)", "cmd_pack_list")]),
                  ("def planted(step=cmd_pack_list):\n    return step\n", [("(module)", "cmd_pack_list")]),
                  ("def planted():\n    emit_list = 1\n    return emit_list\n", []),  # a local
                  ("def planted(confirm):\n    return confirm\n", [])]  # a parameter
        for plant, expected in plants:
            with self.subTest(plant=plant):
                self.assertIn(marker, text)
                planted = text.replace(marker, "\n" + plant + "\n" + marker, 1)
                self.assertEqual(seam_violations(planted), expected)

    def test_auth_token_in_every_token_state_through_the_installed_launcher(self):
        """Each state through the installed launcher, with the second half removed, and
        through the file: the same exit code, stderr and output (a token the server takes)."""
        prefix = os.path.join(self.tmp, "prefix")
        self.assertEqual(self.run_process("self-install", "--prefix", prefix).code, 0)
        rest = os.path.join(prefix, "lib", "attune", attune.REST_FILE)
        os.remove(rest)  # any use of the rest would now fail, loudly
        os.remove(importlib_cache(rest))
        launcher = os.path.join(prefix, "bin", "attune")
        token_file = os.path.join(self.tmp, "token")
        now = int(time.time())
        env_token = self.server.mint("admin", iat=now - 10)
        with open(token_file, "w") as f:
            f.write(self.server.mint("admin", iat=now - 20) + "\n")

        def revoke(entry):
            self.server.revoked.add(entry["refresh_token"])

        states = [  # name, seed(), arguments (global ones before auth token), environment, after seeding
            ("fresh", {}, [], {}, None),
            ("due for refresh", {"access_left": 20}, [], {}, None),
            ("expired", {"access_left": -100}, [], {}, None),
            ("expired, expiry not stored", {"access_left": -100, "store_expiry": False}, [], {}, None),
            ("--min-ttl past what is left", {"access_left": 600}, ["auth", "token", "--min-ttl", "1200"], {}, None),
            ("refresh token revoked", {"access_left": -100}, [], {}, revoke),
            ("refresh token expired", {"access_left": -100, "refresh_left": -10}, [], {}, None),
            ("logged out", {"auth_token": None, "refresh_token": None}, [], {}, None),
            ("invalidated", {"invalidated_at": now - 5}, [], {}, None),
            ("--format json", {}, ["auth", "token", "--format", "json"], {}, None),
            ("--format env", {}, ["auth", "token", "--format", "env"], {}, None),
            ("--format header, expired", {"access_left": -100}, ["auth", "token", "--format", "header"], {}, None),
            ("-j, due", {"access_left": 20}, ["-j"], {}, None),
            ("environment token", {}, [], {"ATTUNE_API_TOKEN": env_token}, None),
            ("token file", {}, [], {"ATTUNE_TOKEN_FILE": token_file}, None),
            ("-p other, due", {"profile": "other", "current": False, "access_left": 20}, ["-p", "other"], {}, None),
            ("ATTUNE_PROFILE unknown", {}, [], {"ATTUNE_PROFILE": "nope"}, None),
        ]
        tokens = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
        for name, seed, argv, env, after in states:
            argv = argv if "auth" in argv else argv + ["auth", "token"]
            with self.subTest(state=name):
                outcomes = []
                for runner in ("installed", "file"):
                    if os.path.exists(self.config):
                        os.unlink(self.config)
                    self.seed(**seed)
                    if seed.get("profile"):
                        self.seed()  # and a current profile beside it
                    if after:
                        after(self.read_doc()["profiles"][seed.get("profile", "default")])
                    if runner == "installed":
                        p = subprocess.run([launcher] + argv, env=self.process_env(env),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           universal_newlines=True, timeout=60)
                        result = Result(p.returncode, p.stdout, p.stderr)
                    else:
                        result = self.run_process(*argv, env=env, secrets_ok=True)
                    self.assertNotIn("Traceback", result.err, (runner, result))
                    for token in tokens.findall(result.out):
                        self.assertIsNone(verify_jwt(token, time.time())[1], (runner, result))
                        self.assertNotIn(token, self.server.revoked)
                    out = re.sub(r'"expires_(at|in)": \d+', r'"expires_\1": N', tokens.sub("TOKEN", result.out))
                    outcomes.append((result.code, out, result.err))  # the seconds tick between the two
                self.assertEqual(outcomes[0], outcomes[1])

    @slow
    def test_complete_through_the_installed_launcher_with_the_rest_gone(self):
        """__complete in the installed first half: commands from the table self-install wrote,
        refs from the server, never the rest; a missing or broken table loads the rest."""
        self.seed()
        prefix = os.path.join(self.tmp, "prefix")
        self.assertEqual(self.run_process("self-install", "--prefix", prefix).code, 0)
        libdir = os.path.join(prefix, "lib", "attune")
        rest, table = os.path.join(libdir, attune.REST_FILE), os.path.join(libdir, attune.COMPLETION_FILE)
        with open(table, encoding="utf-8") as f:
            self.assertEqual(f.read(), attune.completion_table_text(attune.completion_table()))
        os.rename(rest, rest + ".away")
        os.remove(importlib_cache(rest))
        launcher = os.path.join(prefix, "bin", "attune")

        def complete(*words, before=()):
            p = subprocess.run([launcher] + list(before) + ["__complete", "--"] + list(words), env=self.process_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
            self.assertEqual((p.returncode, p.stderr), (0, ""))
            return p.stdout.splitlines()

        self.assertEqual(complete("pack", "l"), ["list"])
        self.assertEqual(complete("pack", "show", "c", before=("-p", "default", "-j")), ["core"])
        self.assertEqual(complete("run", "core.e"), ["core.echo"])
        self.assertEqual(complete("run", "core.echo", "--param", ""), ["message=", "count="])
        self.assertEqual(complete("--output", "j"), ["json"])
        for broken in ("", "attune.py 0.0.0-other\n\n", "attune.py %s\n\nrun\tno tabs enough\n" % attune.__version__,
                       "\x00\xff not text"):
            with self.subTest(table=broken):
                with open(table, "w", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(broken)
                self.assertEqual(complete("pack", "l"), [])  # it would load the rest, which is gone
                self.assertEqual(complete("pack", "l", before=("-p", "default")), [])
                os.rename(rest + ".away", rest)
                self.assertEqual(complete("pack", "l"), ["list"])  # ... which it then does
                os.rename(rest, rest + ".away")


def importlib_cache(path):
    import importlib.util
    return importlib.util.cache_from_source(path)


# === Tests: resource commands ================================================

class ResourceTestCase(AttuneTestCase):
    """Logged in; each test checks the exact requests a command sends."""

    def setUp(self):
        super().setUp()
        self.seed()

    def targets(self):
        return ["%s %s" % (r.method, r.target) for r in self.server.requests]

    def sent(self, method, path):
        matching = [r for r in self.server.requests if r.method == method and r.path == path]
        self.assertEqual(len(matching), 1, self.targets())
        return matching[0]

    def lines(self, *argv, **kwargs):
        return self.ok(*argv, **kwargs).out.splitlines()

    def execute(self, action, *params):
        argv = ["run", action, "-j"]
        for param in params:
            argv += ["--param", param]
        return self.ok(*argv).json()["id"]


class FieldsTests(ResourceTestCase):
    """--fields: the fields asked for, in their order, in every output format."""

    def test_a_list_shows_a_column_per_field_in_every_format(self):
        self.assertEqual(self.lines("pack", "list", "--fields", "version,ref"), [
            "version  ref", "───────  ────────", "1.0.0    core", "1.0.0    linux", "1.0.0    examples"])
        self.assertEqual(self.ok("pack", "list", "--fields", "ref,version", "-j").json(),
                         [{"ref": r, "version": "1.0.0"} for r in ("core", "linux", "examples")])
        self.assertEqual(list(self.ok("pack", "list", "--fields", "version,ref", "-j").json()[0]), ["version", "ref"])
        self.assertTrue(self.ok("pack", "list", "--fields", "ref", "-y").out.startswith("- ref: core\n- ref: linux\n"))
        self.assertEqual(self.targets(), ["GET /api/v1/packs"] * 4)

    def test_one_object_shows_field_lines_and_nested_fields(self):
        eid = self.execute("core.echo", "message=hi")
        self.assertEqual(self.lines("execution", "show", str(eid), "--fields", "id,config.message,status"),
                         ["id:              %d" % eid, "config.message:  hi", "status:          %s"
                          % self.server.executions[eid]["status"]])
        self.assertEqual(self.ok("execution", "show", str(eid), "--fields", "config.message", "-j").json(),
                         {"config.message": "hi"})

    def test_an_empty_list_and_a_field_no_object_has(self):
        self.assertEqual(self.lines("pack", "list", "--name", "nothing-like-it", "--fields", "ref"), ["ℹ No packs found"])
        result = self.fails(2, "pack", "list", "--fields", "ref,colour")
        self.assertIn("no field 'colour' in the answer; its fields: created, description, id", result.err)
        self.assertEqual(result.out, "")

    def test_a_field_value_from_the_server_is_data_on_the_terminal(self):
        self.server.packs["core"]["label"] = "Core\x1b]0;owned\x07\x1b[2J"
        out = self.ok("pack", "list", "--fields", "ref,label").out
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)

    def test_a_malformed_list_is_refused_before_any_request(self):
        hostile = [chr(c) for c in list(range(0, 32)) + [127, 0x85, 0x202e, 0x2066]] + [
            c for c in "!\"#$%&'()*+/:;<=>?@[\\]^`{|}~ "]
        for text in ["", ",", "ref,", ",ref", "ref,,status", "a..b", ".a", "a."] + [
                "ref,st%satus" % c for c in hostile] + ["%sref" % c for c in hostile if not c.isspace()]:
            with self.subTest(text=text):
                before = len(self.server.requests)
                result = self.fails(2, "pack", "list", "--fields", text)
                self.assertIn("--fields takes field names separated by commas", result.err)
                self.assertNotIn("\x1b", result.err)
                self.assertEqual(len(self.server.requests), before)

    def test_a_command_that_prints_no_result_says_fields_did_nothing(self):
        result = self.ok("auth", "token", "--fields", "ref", secrets_ok=True)
        self.assertEqual(result.err, "attune: warning: --fields has no effect on attune auth token\n")
        eid = self.ok("run", "core.echo", "--param", "message=hi", "-w", "-j").json()["id"]
        result = self.ok("execution", "logs", str(eid), "--fields", "ref")
        self.assertEqual((result.out, result.err), ("hi\n", "attune: warning: --fields has no effect on attune "
                                                             "execution logs\n"))


class PackCommandTests(ResourceTestCase):
    def endless_pages(self, distinct):
        """/api/v1/packs says has_next on every page: the same page each time, or a new one."""
        body = {"data": [], "pagination": {"page": 1, "page_size": 100, "has_next": True}}
        served = []

        def next_page():
            served.append(None)
            start = len(served) * 100 if distinct else 0
            body["data"] = [dict(self.server.packs["core"], id=n, ref="p%d" % n) for n in range(start, start + 100)]
        self.server.fail("/api/v1/packs", "GET", 200, body, effect=next_page, times=None)
        return served

    def test_a_page_walk_that_never_ends_is_stopped(self):
        """--all follows has_next, but a page that repeats the one before (a server that ignores
        the page number) ends it at once, and so does a list past the items attune.py holds:
        exit 6, nothing on stdout."""
        served = self.endless_pages(distinct=False)
        result = self.fails(6, "pack", "list", "--all")
        self.assertEqual(result.err, "attune: error: page 2 of /packs repeats page 1 (the server ignores the page "
                                     "number); stopped\n")
        self.assertEqual((result.out, len(served)), ("", 2))
        self.server.faults.clear()
        served = self.endless_pages(distinct=True)
        with mock.patch.object(attune, "LIST_ITEM_LIMIT", 250):
            result = self.fails(6, "pack", "list", "--all", "-j")
        self.assertEqual(result.err, "attune: error: /packs still says has_next after 200 items on 2 pages, more than "
                                     "attune.py walks (250); narrow the list with its filters\n")
        # printed as the pages came: the document stays unfinished, so no reader takes it for the list
        self.assertEqual(len(served), 3)
        self.assertTrue(result.out.startswith("[\n  {"), result.out[:20])
        self.assertFalse(result.out.rstrip().endswith("]"))
        with self.assertRaises(ValueError):
            json.loads(result.out)
        self.assertEqual(json.loads(result.out.rstrip().rstrip(",") + "]").__len__(), 200)

    def test_list_table_and_json(self):
        self.assertEqual(self.lines("pack", "list"), [
            "Ref       Version  Description", "────────  ───────  ──────────────────────────────────",
            "core      1.0.0    Core actions, triggers and sensors", "linux     1.0.0    Actions for Linux hosts",
            "examples  1.0.0    Example workflows and rules"])
        self.assertEqual(self.targets(), ["GET /api/v1/packs"])
        packs = self.ok("pack", "list", "-j").json()
        self.assertEqual([p["ref"] for p in packs], ["core", "linux", "examples"])
        self.assertEqual(packs[0], self.server.packs["core"])
        self.assertTrue(self.ok("pack", "list", "-y").out.startswith("- id: 1\n  ref: core\n"))

    def test_list_filters_by_name_and_says_when_empty(self):
        self.assertEqual([p["ref"] for p in self.ok("pack", "list", "--name", "li", "-j").json()], ["linux"])
        self.server.packs.clear()
        self.assertEqual(self.ok("pack", "list").out, "ℹ No packs found\n")
        self.assertEqual(self.ok("pack", "list", "-j").json(), [])

    def test_list_all_follows_every_page(self):
        for i in range(230):
            ref = "p%03d" % i
            self.server.packs[ref] = self.server.new_pack(1000 + i, ref, ref)
        first = self.ok("pack", "list", "-j")
        self.assertEqual(len(first.json()), 50)
        self.assertIn("showing the first 50 of 233 packs; add --all for every page", first.err)
        del self.server.requests[:]
        every = self.ok("pack", "list", "--all", "-j").json()
        self.assertEqual(len(every), 233)
        self.assertEqual(len({p["ref"] for p in every}), 233)
        self.assertEqual(self.targets(), ["GET /api/v1/packs?page=%d&page_size=100" % n for n in (1, 2, 3)])

    def test_show(self):
        out = self.ok("pack", "show", "linux").out
        self.assertEqual(out.splitlines()[:4], ["Pack: Linux", "───────────", "Ref:          linux",
                                                "Label:        Linux"])
        for row in ("Author:       Attune team", "Actions:      1", "Rules:        1", "Sensors:      1",
                    "Created:      2026-11-01 12:00:00", "Pack Dependencies", "  • core"):
            self.assertIn(row, out)
        self.assertEqual(self.ok("pack", "show", "linux", "-j").json()["action_count"], 1)
        self.assertEqual(self.targets(), ["GET /api/v1/packs/linux"] * 2)
        error = self.fails(1, "pack", "show", "nope")
        self.assertEqual(error.err, "attune: error: API error (404 Not Found, code NOT_FOUND): Pack 'nope' not found\n")

    def test_create(self):
        out = self.ok("pack", "create", "--ref", "my_pack-x").out
        pack = self.server.packs["my_pack-x"]
        self.assertEqual(out, "✓ Pack 'my_pack-x' created successfully (id: %d)\n" % pack["id"])
        self.assertEqual(self.sent("POST", "/api/v1/packs").body,
                         b'{"ref": "my_pack-x", "label": "My Pack X", "version": "0.1.0", "tags": []}')
        data = self.ok("pack", "create", "-r", "other", "-l", "Other", "-d", "desc", "--pack-version", "2.0.0",
                       "--tags", "a, b", "-j").json()
        self.assertEqual(self.server.requests[-1].json(), {"ref": "other", "label": "Other", "description": "desc",
                                                          "version": "2.0.0", "tags": ["a", "b"]})
        self.assertEqual(data["ref"], "other")

    def test_create_errors(self):
        result = self.fails(2, "pack", "create", "--label", "x")
        self.assertIn("Pack ref is required", result.err)
        self.assertEqual(self.server.count(), 0)
        result = self.fails(1, "pack", "create", "--ref", "core")
        self.assertIn("API error (409 Conflict, code CONFLICT): Pack with ref 'core' already exists", result.err)

    def test_install(self):
        result = self.ok("pack", "install", "https://github.com/org/slack.git")
        self.assertEqual(self.sent("POST", "/api/v1/packs/install").json(), {
            "source": "https://github.com/org/slack.git", "ref_spec": None, "registry_id": None, "force": False,
            "skip_tests": False, "skip_deps": False, "no_registry": False, "absent_metadata_policy": "remove"})
        self.assertEqual(result.out.splitlines(), [
            "ℹ Installing pack from source type: git repository", "ℹ Starting installation...",
            "✓ Pack 'slack' installed successfully", "ℹ   Version: 1.0.0",
            "ℹ   ID: %d" % self.server.packs["slack"]["id"], "✓ All tests passed", "ℹ   Tests: 3/3 passed"])
        result = self.ok("pack", "install", "slack", "-r", "v1.2", "--force", "--skip-deps", "--skip-tests",
                         "--no-registry", "--absent-metadata-policy", "retain")
        self.assertEqual(self.server.requests[-1].json(), {
            "source": "slack", "ref_spec": "v1.2", "registry_id": None, "force": True, "skip_tests": True,
            "skip_deps": True, "no_registry": True, "absent_metadata_policy": "retain"})
        self.assertIn("Installing pack from source type: unknown source", result.out)
        self.assertIn("⚠ Dependency validation will be skipped", result.out)
        self.assertIn("⚠ Tests were skipped", result.out)
        data = self.ok("pack", "install", "slack", "--force", "-j").json()
        self.assertEqual(data["pack"]["ref"], "slack")
        self.ok("pack", "install", "slack", "--force", "--skip-deps", "--registry-id", "4")
        body = self.server.requests[-1].json()
        self.assertEqual((body["registry_id"], body["skip_tests"], body["skip_deps"]), (4, False, True))
        self.assertIn("--registry-id cannot be combined with --no-registry",
                      self.fails(2, "pack", "install", "x", "--registry-id", "4", "--no-registry").err)

    def test_install_waits_for_the_packs_tests(self):
        self.server.install_tests = "succeeded"
        with mock.patch.object(attune, "INSTALL_POLL", 0.05):
            result = self.ok("pack", "install", "slack")
            install_id = max(self.server.installs)
            self.assertIn("ℹ   Running pack tests (install %d)...\n✓   Pack tests passed\n" % install_id, result.out)
            self.assertIn("ℹ   Tests: 3/3 passed", result.out)
            self.assertEqual(self.server.count("GET", "/api/v1/packs/install/%d" % install_id), 2)
            data = self.ok("pack", "install", "slack", "--force", "-j").json()
            self.assertEqual((data["install_status"], data["test_result"]["total_tests"]), ("succeeded", 3))
            for outcome, message in (("rolled_back", "the pack's tests failed and the new pack install was rolled "
                                                     "back: 2 tests failed"),
                                     ("failed", "the pack's tests failed: 2 tests failed")):
                with self.subTest(outcome=outcome):
                    self.server.install_tests = outcome
                    result = self.fails(1, "pack", "register", "/opt/attune/packs/slack", "--force")
                    self.assertIn("attune: error: " + message, result.err)
                    self.assertIn("Tests: 1/3 passed", result.out)
            with mock.patch.object(attune, "INSTALL_WAIT", 0.01):
                self.server.install_tests = "succeeded"
                result = self.ok("pack", "install", "slack", "--force")
                self.assertIn("Timed out waiting for pack tests to complete", result.err)

    def test_register(self):
        result = self.ok("pack", "register", "/opt/attune/packs/monitoring", "--force", "--skip-tests")
        self.assertEqual(self.sent("POST", "/api/v1/packs/register").json(),
                         {"path": "/opt/attune/packs/monitoring", "force": True, "skip_tests": True,
                          "absent_metadata_policy": "remove"})
        self.assertIn("✓ Pack 'monitoring' registered successfully", result.out)
        self.assertEqual(result.err, "")
        local = self.ok("pack", "register", "./mypack")
        self.assertIn("attune pack upload ./mypack", local.err)

    def make_pack_dir(self):
        root = os.path.join(self.tmp, "mypack")
        for name, text in (("pack.yaml", "ref: mypack  # the ref\nversion: 1.0.0\n"),
                           ("actions/hello.py", "print('hi')\n"), (".git/config", "[core]\n")):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
        return root

    def test_upload_a_directory(self):
        root = self.make_pack_dir()
        result = self.ok("pack", "upload", root)
        upload = self.server.uploads[0]
        self.assertEqual((upload["filename"], upload["content_type"], upload["fields"]),
                         ("mypack.tar.gz", "application/gzip", {"absent_metadata_policy": "remove"}))
        self.assertEqual(sorted(upload["names"]), ["actions/hello.py", "pack.yaml"])
        self.assertIn("ℹ Uploading pack 'mypack' from: %s" % root, result.out)
        self.assertIn("✓ Pack 'mypack' uploaded and registered successfully", result.out)
        self.assertTrue(self.server.requests[-1].headers["Content-Type"].startswith("multipart/form-data; boundary="))
        self.ok("pack", "upload", root, "--force", "--skip-tests", "--absent-metadata-policy", "disable")
        self.assertEqual(self.server.uploads[1]["fields"], {"force": "true", "skip_tests": "true",
                                                            "absent_metadata_policy": "disable"})

    def test_upload_an_archive_and_bad_paths(self):
        import tarfile
        archive = os.path.join(self.tmp, "bundle.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(os.path.join(self.make_pack_dir(), "pack.yaml"), arcname="pack.yaml")
        self.ok("pack", "upload", archive)
        self.assertEqual(self.server.uploads[0]["filename"], "mypack.tar.gz")
        self.assertIn("Path does not exist", self.fails(2, "pack", "upload", os.path.join(self.tmp, "nope")).err)
        os.makedirs(os.path.join(self.tmp, "empty"))
        self.assertIn("No pack.yaml found", self.fails(2, "pack", "upload", os.path.join(self.tmp, "empty")).err)
        plain = os.path.join(self.tmp, "plain.txt")
        with open(plain, "w") as f:
            f.write("x")
        self.fails(2, "pack", "upload", plain)
        self.assertEqual(len(self.server.uploads), 1)

    def test_update(self):
        result = self.ok("pack", "update", "linux", "--label", "Linux hosts", "--description", "new",
                         "--pack-version", "2.0.0")
        self.assertEqual(self.sent("PUT", "/api/v1/packs/linux").json(), {
            "label": "Linux hosts", "description": {"op": "set", "value": "new"}, "version": "2.0.0"})
        self.assertIn("✓ Pack 'linux' updated successfully", result.out)
        self.assertIn("Version:      2.0.0", result.out)
        self.ok("pack", "update", "linux", "--description", "")
        self.assertEqual(self.server.requests[-1].json(), {"description": {"op": "clear"}})
        self.assertIsNone(self.server.packs["linux"]["description"])
        self.assertIn("At least one field", self.fails(2, "pack", "update", "linux").err)

    def test_update_version_is_the_packs_version(self):
        """The Rust CLI's `pack update R --version V`: the pack's version, never the program's."""
        for argv in (["pack", "update", "core", "--version", "3.1.0"], ["pack", "update", "--version=3.1.0", "core"],
                     ["-j", "pack", "update", "core", "--version", "3.1.0"]):
            with self.subTest(argv=argv):
                del self.server.requests[:]
                result = self.ok(*argv)
                self.assertNotIn(attune.__version__, result.out)
                self.assertEqual(self.sent("PUT", "/api/v1/packs/core").json(), {"version": "3.1.0"})
        process = self.run_process("pack", "update", "core", "--version", "3.2.0")  # the quick path too
        self.assertEqual(process.code, 0, process.err)
        self.assertEqual(self.server.packs["core"]["version"], "3.2.0")
        self.assertEqual(self.ok("--version").out, attune.version_text() + "\n")
        self.assertIn(attune.__version__, self.ok("pack", "list", "--version").out)
        self.assertEqual(self.fails(2, "pack", "update", "core", "--version").code, 2)

    def test_uninstall(self):
        self.assertEqual(self.ok("pack", "uninstall", "linux", "--yes").out,
                         "✓ Pack 'linux' uninstalled successfully\n")
        self.assertEqual(self.targets(), ["DELETE /api/v1/packs/linux"])
        self.assertEqual(self.ok("pack", "uninstall", "examples", "--yes", "-j").json(),
                         {"message": "Pack uninstalled successfully"})
        self.fails(1, "pack", "uninstall", "linux", "--yes")


class ActionCommandTests(ResourceTestCase):
    def test_list(self):
        lines = self.lines("action", "list")
        self.assertEqual(lines[0], "Ref              Label   Runtime              Enabled  Description")
        self.assertEqual(lines[2], "core.echo        Echo    core.python (>=3.9)  ✓        Print a message")
        self.assertIn("examples.deploy  Deploy  Workflow             ✓        Build, test and notify", lines)
        self.ok("action", "list", "--pack", "linux")
        self.assertEqual(self.targets(), ["GET /api/v1/actions", "GET /api/v1/packs/linux/actions"])
        self.assertEqual([a["ref"] for a in self.ok("action", "list", "-n", "echo", "-j").json()], ["core.echo"])
        self.assertIn("Pack 'nope' not found", self.fails(1, "action", "list", "--pack", "nope").err)

    def test_show_with_parameter_schema(self):
        out = self.ok("action", "show", "core.echo").out
        self.assertIn("Entry Point:  echo.py", out)
        self.assertIn("\nParameters Schema\n─────────────────\nName     Type     Required  Default  Description\n", out)
        self.assertIn("message  string   ✓                  Text to print", out)
        self.assertEqual(self.ok("action", "show", "core.echo", "-j").json()["param_schema"]["count"]["default"], 1)

    def test_search(self):
        result = self.ok("action", "search", "print message", "--pack", "core", "--pack", "linux", "--limit", "5")
        self.assertEqual(self.targets(), ["GET /api/v1/actions/search?q=print+message&packs=core%2Clinux"
                                          "&page_size=5&page=1"])
        self.assertIn("core.echo  core  Echo   core.python", result.out)
        self.assertEqual(self.ok("action", "search", "nothing-like-this").out,
                         "ℹ No actions matched the search query\n")
        self.ok("action", "search")
        self.assertEqual(self.server.requests[-1].target, "/api/v1/actions/search?page_size=50&page=1")

    def test_enable_disable_delete(self):
        result = self.ok("action", "disable", "core.echo")
        self.assertEqual(self.sent("PUT", "/api/v1/actions/core.echo").json(), {"enabled": False})
        self.assertIn("✓ Action 'core.echo' updated successfully", result.out)
        self.assertIn("Enabled:      ✗", result.out)
        self.assertTrue(self.ok("action", "enable", "core.echo", "-j").json()["enabled"])
        self.assertEqual(self.ok("action", "delete", "core.echo", "--yes").out,
                         "✓ Action 'core.echo' deleted successfully\n")
        self.assertNotIn("core.echo", self.server.actions)

    def test_execute(self):
        result = self.ok("action", "execute", "core.echo", "--param", "message=hi there", "--param", "count=3",
                         "--param", 'obj={"a": 1}', "--param", "flag=true", "--param", "text=not json",
                         "--param", "eq=a=b", "--param", "nan=NaN")
        execution = self.server.executions[max(self.server.executions)]
        self.assertEqual(self.sent("POST", "/api/v1/executions/execute").json(), {
            "action_ref": "core.echo", "parameters": {
                "message": "hi there", "count": 3, "obj": {"a": 1}, "flag": True, "text": "not json",
                "eq": "a=b", "nan": "NaN"}})
        self.assertEqual(result.out.splitlines(), [
            "ℹ Executing action: core.echo", "✓ Execution %d started" % execution["id"],
            "Execution ID:  %d" % execution["id"], "Action:        core.echo", "Status:        requested"])
        data = self.ok("run", "core.echo", "--params-json", '{"message": "x"}', "--execution-timeout", "30",
                       "--worker-selector", '{"pool": "gpu"}', "-j").json()
        self.assertEqual(self.server.requests[-1].json(), {
            "action_ref": "core.echo", "parameters": {"message": "x"}, "worker_selector": {"pool": "gpu"},
            "timeout_seconds": 30})
        self.assertEqual((data["status"], data["action_ref"]), ("requested", "core.echo"))

    def test_execute_usage_errors(self):
        cases = {("--param", "novalue"): "Invalid parameter format: 'novalue'. Expected key=value",
                 ("--param", "=x"): "Invalid parameter format: '=x'",
                 ("--params-json", "{oops"): "--params-json is not valid JSON",
                 ("--params-json", "[1]"): "--params-json must be a JSON object",
                 ("--params-json", '{"a": NaN}'): "--params-json is not valid JSON: NaN is not valid JSON",
                 ("--params-json", "{}", "--param", "a=1"): "not both",
                 ("--worker-affinity", "nope"): "--worker-affinity is not valid JSON",
                 ("--timeout", "5"): "--timeout only applies with --watch",
                 ("--execution-timeout", "0"): "expected seconds (30, 30s, 5m or 1h) from 1"}
        for extra, message in cases.items():
            with self.subTest(extra):
                self.assertIn(message, self.fails(2, "action", "execute", "core.echo", *extra).err)
        self.assertEqual(self.server.count("POST", "/api/v1/executions/execute"), 0)

    def test_execute_server_errors(self):
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Action 'nope.x' not found", self.fails(1, "run", "nope.x").err)
        self.server.actions["core.echo"]["enabled"] = False
        self.assertIn("Action 'core.echo' is disabled", self.fails(1, "run", "core.echo").err)

    def test_execute_watch_success(self):
        result = self.ok("run", "core.echo", "--param", "message=hello", "--watch")
        eid = max(self.server.executions)
        out = result.out
        self.assertIn("ℹ Waiting for execution %d to complete..." % eid, out)
        self.assertIn("✓ Execution %d completed\n\nExecution Details\n" % eid, out)
        self.assertIn("Status:        completed", out)
        self.assertIn("\nStdout\n──────\nhello\n", out)
        self.assertIn('\nResult\n──────\n{\n  "exit_code": 0\n}\n', out)
        polls = [t for t in self.targets() if t == "GET /api/v1/executions/%d" % eid]
        self.assertLessEqual(len(polls), 3)  # the notifier told the rest
        self.assertEqual(self.server.ws_sessions[0]["filters"], ["entity:execution:%d" % eid])
        self.server.notifier["enabled"] = False  # polling: requested -> scheduled -> running -> completed
        self.ok("run", "core.echo", "--param", "message=hello", "--watch")
        self.assertEqual(self.targets().count("GET /api/v1/executions/%d" % max(self.server.executions)), 3)

    def test_execute_watch_failure_and_json(self):
        result = self.fails(1, "run", "core.fail", "-w")
        self.assertIn("Status:        failed", result.out)
        self.assertIn("✗ Execution %d failed\n" % max(self.server.executions), result.out)
        self.assertNotIn("completed", result.out)
        self.assertIn("attune: error: execution finished with status 'failed'", result.err)
        result = self.fails(1, "run", "core.fail", "-w", "-j")
        self.assertEqual(result.json()["status"], "failed")
        self.assertEqual(self.ok("run", "core.echo", "--param", "message=x", "-w", "-j").json()["result"],
                         {"stdout": "x\n", "exit_code": 0})

    def test_execute_watch_timeout(self):
        started = time.monotonic()
        result = self.fails(1, "run", "core.sleep", "--watch", "--timeout", "1")
        self.assertIn("timed out after 1s waiting for execution", result.err)
        self.assertIn("status 'running'", result.err)
        self.assertLess(time.monotonic() - started, 60)  # a hang guard; the message says the deadline ended it


class ExecutionCommandTests(ResourceTestCase):
    def test_list_sends_the_filters_the_server_knows(self):
        self.ok("execution", "list", "--pack", "core", "-a", "core.*", "--rule", "r.x", "--trigger", "t.y",
                "--trace-tag", "tag", "-s", "Running", "-r", "BooM", "--top-level-only", "-l", "25")
        self.assertEqual(self.targets(), [
            "GET /api/v1/executions?per_page=25&pack_name=core&action_ref=core.%2A&rule_ref=r.x"
            "&trigger_ref=t.y&trace_tag=tag&status=running&result_contains=boom&top_level_only=true"])
        self.ok("execution", "list")
        self.assertEqual(self.targets()[-1], "GET /api/v1/executions?per_page=50")

    def test_list_filters_several_statuses_and_sorts_newest_first(self):
        ok, bad = self.execute("core.echo", "message=a"), self.execute("core.fail")
        self.ok("execution", "watch", str(ok), "-j")
        self.fails(1, "execution", "watch", str(bad), "-j")
        running = self.execute("core.sleep")
        rows = self.ok("execution", "list", "-s", "completed", "-s", "FAILED", "-j").json()
        self.assertEqual([r["id"] for r in rows], [bad, ok])
        self.assertNotIn("status=", self.server.requests[-1].target)
        table = self.lines("execution", "list")
        self.assertEqual(table[0], "ID   Action      Trace Tag  Rule  Trigger  Status     Created")
        self.assertTrue(table[2].startswith("%d  core.sleep  -          -     -        requested" % running))
        self.assertEqual(len(self.ok("execution", "list", "-l", "2", "-j").json()), 2)

    def test_a_status_the_server_does_not_know_is_refused_before_the_request(self):
        for status, hint in (("succeeded", "did you mean completed?"), ("canceled", "did you mean cancelled?"),
                             ("success", "did you mean completed?"), ("bogus", "statuses: requested, scheduling")):
            for argv in (["execution", "list", "--status", status], ["execution", "watch", "-s", "running",
                                                                     "-s", status, "--timeout", "1"]):
                with self.subTest(argv=argv):
                    self.server.requests.clear()
                    result = self.fails(2, *argv)
                    self.assertIn("unknown execution status '%s'" % status, result.err)
                    self.assertIn(hint, result.err)
                    self.assertEqual(self.targets(), [])
        for status in attune.EXECUTION_STATUSES:
            self.ok("execution", "list", "--status", status.upper())
            self.assertIn("status=%s" % status, self.server.requests[-1].target)

    def test_list_wildcards_on_the_client_side(self):
        self.execute("core.echo", "message=a")
        self.execute("linux.uptime")
        self.server.fail("/api/v1/executions", status=200, body={"items": [
            dict(self.server.executions[e]) for e in sorted(self.server.executions)]})
        self.assertEqual([r["action_ref"] for r in self.ok("execution", "list", "-a", "linux.*", "-j").json()],
                         ["linux.uptime"])

    def test_list_all_pages_and_empty(self):
        self.assertEqual(self.ok("execution", "list").out, "ℹ No executions found\n")
        for _ in range(120):
            self.server.new_execution(self.server.actions["core.echo"], {})
        del self.server.requests[:]
        self.assertEqual(len(self.ok("execution", "list", "--all", "-j").json()), 120)
        self.assertEqual(self.targets(), ["GET /api/v1/executions?per_page=100&page=1",
                                          "GET /api/v1/executions?per_page=100&page=2"])

    def test_show(self):
        eid = self.execute("core.echo", "message=hi")
        self.server.executions[eid]["timeout_seconds"] = 90
        out = self.ok("execution", "show", str(eid)).out
        self.assertTrue(out.startswith("Execution: %d\n" % eid))
        for row in ("Action:          core.echo", "Timeout:         1m 30s (90s)", "Parent ID:       -",
                    "Trace Tag:       -", '\nConfiguration\n─────────────\n{\n  "message": "hi"\n}'):
            self.assertIn(row, out)
        self.assertEqual(self.ok("execution", "show", str(eid), "-j").json()["config"], {"message": "hi"})
        self.assertIn("Execution with ID 999 not found", self.fails(1, "execution", "show", "999").err)
        self.assertIn("expected a whole number from 1 to 9223372036854775807, not 'abc'",
                      self.fails(2, "execution", "show", "abc").err)

    def test_result(self):
        eid = self.execute("core.echo", "message=hi")
        self.assertIn("Execution %d has no result yet" % eid, self.fails(1, "execution", "result", str(eid)).err)
        self.ok("execution", "watch", str(eid), "-j")
        self.assertEqual(self.ok("execution", "result", str(eid)).out,
                         '{\n  "stdout": "hi\\n",\n  "exit_code": 0\n}\n')
        self.assertEqual(self.ok("execution", "result", str(eid), "-f", "yaml").out,
                         'stdout: "hi\\n"\nexit_code: 0\n')
        self.assertEqual(self.ok("execution", "result", str(eid), "-y").out, 'stdout: "hi\\n"\nexit_code: 0\n')

    def test_cancel(self):
        eid = self.execute("core.sleep")
        self.assertEqual(self.ok("execution", "cancel", str(eid), "--yes").out, "✓ Execution %d cancelled\n" % eid)
        self.assertEqual(self.sent("POST", "/api/v1/executions/%d/cancel" % eid).json(), {})
        self.assertEqual(self.server.executions[eid]["status"], "cancelled")
        result = self.fails(1, "execution", "cancel", str(eid), "--yes")
        self.assertIn("API error (409 Conflict, code CONFLICT)", result.err)

    def test_watch(self):
        eid = self.execute("core.echo", "message=hi")
        result = self.ok("execution", "watch", str(eid))
        self.assertTrue(result.out.startswith("ℹ Observing execution %d...\n✓ Execution %d completed" % (eid, eid)))
        bad = self.execute("core.fail")
        self.assertIn("execution finished with status 'failed'", self.fails(1, "execution", "watch", str(bad)).err)
        slow = self.execute("core.sleep")
        self.assertIn("timed out after 1s", self.fails(1, "execution", "watch", str(slow), "--timeout", "1").err)

    def test_watch_accepts_the_rust_clis_success_words(self):
        eid = self.execute("core.sleep")
        self.server.executions[eid]["status"] = "succeeded"
        self.server.plans[eid]["statuses"] = []
        self.ok("execution", "watch", str(eid))

    def test_logs_catch_up(self):
        eid = self.execute("core.noisy")
        self.ok("execution", "watch", str(eid), "-j")
        out = self.ok("execution", "logs", str(eid)).out
        self.assertEqual(out, "".join("line %d\n" % n for n in range(1, 11)))
        self.assertEqual(self.targets()[-1], "GET /api/v1/executions/%d/logs/stdout/stream" % eid)
        self.assertEqual(self.server.requests[-1].headers["Accept"], "text/event-stream")
        bad = self.execute("core.fail")
        self.fails(1, "execution", "watch", str(bad))
        self.assertEqual(self.ok("execution", "logs", str(bad), "--stderr").out, "boom\n")
        self.assertEqual(self.ok("execution", "logs", str(bad)).out, "")
        data = self.ok("execution", "logs", str(eid), "-j").json()
        self.assertEqual(data, {"execution_id": eid, "stream": "stdout", "offset": 71,
                                "content": "".join("line %d\n" % n for n in range(1, 11))})
        self.assertIn("Execution with ID 999 not found", self.fails(1, "execution", "logs", "999").err)

    def test_logs_follow_until_done(self):
        eid = self.execute("core.noisy")
        out = self.ok("execution", "logs", str(eid), "--follow").out
        self.assertEqual(out, "".join("line %d\n" % n for n in range(1, 11)))
        self.assertEqual(self.server.executions[eid]["status"], "completed")

    def test_logs_follow_reconnects_from_the_last_offset(self):
        eid = self.execute("core.noisy")
        self.server.log_drops[eid] = (3, False)
        out = self.ok("execution", "logs", str(eid), "-f").out
        self.assertEqual(out, "".join("line %d\n" % n for n in range(1, 11)))
        streams = [t for t in self.targets() if "/logs/" in t]
        self.assertEqual(streams, ["GET /api/v1/executions/%d/logs/stdout/stream" % eid,
                                   "GET /api/v1/executions/%d/logs/stdout/stream?offset=21" % eid])

    def test_logs_reconnect_refreshes_the_token_after_a_401(self):
        eid = self.execute("core.noisy")
        self.server.log_drops[eid] = (2, True)  # drop, and revoke the token the stream used
        out = self.ok("execution", "logs", str(eid), "-f").out
        self.assertEqual(out, "".join("line %d\n" % n for n in range(1, 11)))
        tail = [t for t in self.targets() if "/logs/" in t or "refresh" in t]
        self.assertEqual(tail, ["GET /api/v1/executions/%d/logs/stdout/stream" % eid,
                                "GET /api/v1/executions/%d/logs/stdout/stream?offset=14" % eid,
                                "POST /auth/refresh",
                                "GET /api/v1/executions/%d/logs/stdout/stream?offset=14" % eid])

    def test_rerun_merges_parameters(self):
        eid = self.execute("core.echo", "message=a", "count=2")
        result = self.ok("execution", "rerun", str(eid), "--param", "count=5")
        new = max(self.server.executions)
        self.assertEqual(self.server.requests[-1].json(),
                         {"action_ref": "core.echo", "parameters": {"message": "a", "count": 5}})
        self.assertIn("ℹ Rerunning execution %d (action: core.echo)" % eid, result.out)
        self.assertIn("✓ Execution %d started (rerun of %d)" % (new, eid), result.out)
        self.assertIn("Rerun of:      %d" % eid, result.out)
        self.ok("execution", "rerun", str(eid), "--params-json", '{"message": "b"}')
        self.assertEqual(self.server.requests[-1].json()["parameters"], {"message": "b"})
        self.assertEqual(self.ok("execution", "rerun", str(eid), "-w", "-j").json()["status"], "completed")

    def test_rerun_refuses_redacted_secrets_before_posting(self):
        eid = self.execute("core.echo", "message=a")
        marker = {"$attune_secret": True, "redacted": True}
        self.server.executions[eid]["config"] = {"password": marker, "nested": [{"token": marker}], "plain": 1}
        posts = self.server.count("POST", "/api/v1/executions/execute")
        result = self.fails(2, "execution", "rerun", str(eid))
        self.assertIn("redacted secrets at /nested/0/token, /password", result.err)
        self.assertEqual(self.server.count("POST", "/api/v1/executions/execute"), posts)
        self.ok("execution", "rerun", str(eid), "--param", "password=new", "--param", 'nested=[{"token": "t"}]')
        self.assertEqual(self.server.requests[-1].json()["parameters"],
                         {"password": "new", "nested": [{"token": "t"}], "plain": 1})


class DroppingListener:
    """A TCP port that accepts each connection and closes it at once (a notifier that
    refuses TLS, or anything else that is not a WebSocket server). With record, it first
    keeps what the client sent up to the end of its request head (a WebSocket handshake)."""

    def __init__(self, host="127.0.0.1", record=False):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.accepted, self.record, self.received = 0, record, []
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.record:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


class NotifierTests(ResourceTestCase):
    """The notifier's WebSocket during a watch, and the quiet fallback to polling."""

    def test_a_watch_subscribes_to_its_execution(self):
        result = self.ok("run", "core.echo", "--param", "message=hi", "-w")
        eid = max(self.server.executions)
        self.assertIn("✓ Execution %d completed" % eid, result.out)
        self.assertEqual(result.err, "")
        [ws] = self.server.ws_sessions
        self.assertEqual(ws["protocol"], "attune.v1")
        self.assertEqual(ws["token"], self.profile()["auth_token"])
        self.assertEqual(ws["filters"], ["entity:execution:%d" % eid])
        self.wait_until(lambda: ws["closed"])
        self.assertEqual(ws["closed"], "client")
        self.assertTrue([m for m in ws["sent"] if m["type"] == "notification" and m["entity_id"] == eid])
        upgrade = [r for r in self.server.requests if r.path == "/ws"][0]
        self.assertEqual(upgrade.headers["Upgrade"], "websocket")
        self.assertEqual(upgrade.headers["Sec-WebSocket-Version"], "13")

    @slow
    def test_a_wss_notifier_whose_tls_fails_is_tried_then_polling(self):
        """wss:// is tried like ws://: the TLS handshake fails (the peer drops it), and the
        watch polls instead, quietly, for run -w and for execution watch ID alike."""
        listener = DroppingListener()
        self.addCleanup(listener.close)
        url = "wss://127.0.0.1:%d" % listener.port
        result = self.ok("run", "core.echo", "-w", "--notifier-url", url)
        eid = max(self.server.executions)
        self.assertIn("✓ Execution %d completed" % eid, result.out)
        self.assertEqual((listener.accepted, result.err), (1, ""))
        eid = self.execute("core.sleep", "seconds=1")  # still running when the watch starts
        result = self.ok("-v", "execution", "watch", str(eid), "--notifier-url", url)
        self.assertEqual(listener.accepted, 2)
        self.assertIn("notifier %s: " % url, result.err)
        self.assertIn("; polling instead", result.err)
        self.assertIn("GET /api/v1/executions/%d" % eid, self.targets())

    def test_every_failure_falls_back_to_polling_quietly(self):
        listener = DroppingListener()
        self.addCleanup(listener.close)
        setups = [
            ("down", lambda: self.server.notifier.update(enabled=False), []),
            ("refused", lambda: self.server.fail("/ws", status=401, body={"error": "invalid_or_expired_token"}), []),
            ("dropped", lambda: self.server.fail("/ws", drop=True), []),
            ("error frame", lambda: self.server.notifier.update(error="Invalid filter 'x'"), []),
            ("silent", lambda: self.server.notifier.update(silent=True), []),
            ("closed 4401", lambda: self.server.notifier.update(close=(4401, "token expired")), []),
            ("wss refused", lambda: None, ["--notifier-url", "wss://127.0.0.1:%d" % listener.port]),
            ("ws refused", lambda: None, ["--notifier-url", "ws://127.0.0.1:%d/" % listener.port]),
        ]
        for name, setup, extra in setups:
            with self.subTest(name):
                self.server.notifier.update(enabled=True, error=None, silent=False, close=None)
                setup()
                result = self.ok("run", "core.echo", "--param", "message=%s" % name, "-w", *extra)
                self.assertIn("✓ Execution %d completed" % max(self.server.executions), result.out)
                self.assertIn("\nStdout\n──────\n%s\n" % name, result.out)
                self.assertEqual(result.err, "")
        self.assertEqual(listener.accepted, 2)
        verbose = self.ok("-v", "run", "core.echo", "-w", "--notifier-url", "ws://127.0.0.1:%d" % listener.port)
        self.assertIn("notifier ws://127.0.0.1:%d: " % listener.port, verbose.err)
        self.assertIn("; polling instead", verbose.err)

    def test_wss_trusts_what_https_trusts(self):
        tls = FakeAttune(tls=True).start()
        self.addCleanup(tls.stop)
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        self.seed(api_url=tls.url)
        result = self.ok("--ca-bundle", ca, "run", "core.echo", "--param", "message=tls", "-w")
        self.assertIn("\nStdout\n──────\ntls\n", result.out)
        self.assertEqual(result.err, "")
        self.assertEqual(tls.ws_sessions[0]["filters"], ["entity:execution:%d" % max(tls.executions)])
        self.seed()  # the API over http; the notifier's certificate is not trusted: polling, quietly
        result = self.ok("run", "core.echo", "-w", "--notifier-url", "wss://127.0.0.1:%d" % tls.port)
        self.assertEqual(result.err, "")
        self.assertIn("✓ Execution %d completed" % max(self.server.executions), result.out)
        self.assertEqual(len(tls.ws_sessions), 1)

    def test_the_notifier_url(self):
        listener = DroppingListener()
        self.addCleanup(listener.close)
        self.ok("run", "core.echo", "-w", env={"ATTUNE_NOTIFIER_WS_URL": "ws://127.0.0.1:%d" % listener.port})
        self.assertEqual(listener.accepted, 1)
        self.assertEqual(self.server.ws_sessions, [])
        self.ok("run", "core.echo", "-w", env={"ATTUNE_NOTIFIER_WS_URL": "  "})  # blank: from the API URL
        self.assertEqual(len(self.server.ws_sessions), 1)
        cases = [("http://localhost:8080", "ws://localhost:8081"), ("https://api.example.com", "wss://api.example.com"),
                 ("https://api.example.com:8443/attune", "wss://api.example.com:8443/attune"),
                 ("https://gw.example.com/attune/", "wss://gw.example.com/attune/"),
                 ("http://[::1]:8080", "ws://[::1]:8081"), ("HTTPS://h:18080", "wss://h:18080")]
        ctx = types.SimpleNamespace(args=types.SimpleNamespace(notifier_url=None), env={})
        for api_url, expected in cases:
            self.assertEqual(attune.notifier_base(ctx, types.SimpleNamespace(api_url=api_url)), expected)
        for bad in ("http://127.0.0.1:1", "ws://", "ws://h:99999", "ws://u:p@h", "ws://h/\x1b[2J"):
            result = self.fails(3, "run", "core.echo", "-w", "--notifier-url", bad)
            self.assertIn("the notifier URL from --notifier-url is not usable", result.err)
            self.assertNotIn("\x1b", result.err)
            result = self.fails(3, "execution", "watch", "1", env={"ATTUNE_NOTIFIER_WS_URL": bad})
            self.assertIn("the notifier URL from ATTUNE_NOTIFIER_WS_URL is not usable", result.err)
        self.assertIn("--notifier-url only applies with --watch",
                      self.fails(2, "run", "core.echo", "--notifier-url", "ws://h").err)

    def test_behind_a_reverse_proxy_with_a_path_every_request_keeps_it(self):
        gateway = FakeAttune(prefix="/attune").start()
        self.addCleanup(gateway.stop)
        self.seed(api_url=gateway.url, access_left=-100)  # a refresh too goes through the gateway
        result = self.ok("run", "core.echo", "--param", "message=proxied", "-w")
        self.assertIn("\nStdout\n──────\nproxied\n", result.out)
        self.assertEqual(result.err, "")
        self.assertEqual(gateway.gateway_misses, [])
        [ws] = gateway.ws_sessions
        self.assertEqual(ws["filters"], ["entity:execution:%d" % max(gateway.executions)])
        self.assertEqual(gateway.count("POST", "/auth/refresh"), 1)

    def test_a_stored_session_goes_to_no_notifier_on_another_host(self):
        """The origin rule covers the notifier: a stored token goes only to the API's host
        (wss for https); any other notifier URL gets nothing and the watch polls. An
        environment token goes where the user points it."""
        elsewhere = DroppingListener(host="127.0.0.2", record=True)
        self.addCleanup(elsewhere.close)
        url = "ws://127.0.0.2:%d" % elsewhere.port
        result = self.ok("-v", "run", "core.echo", "-w", "--notifier-url", url)
        self.assertIn("✓ Execution %d completed" % max(self.server.executions), result.out)
        self.assertIn("the stored session is not sent there; polling instead", result.err)
        self.ok("execution", "watch", str(max(self.server.executions)), env={"ATTUNE_NOTIFIER_WS_URL": url})
        self.assertEqual((elsewhere.accepted, elsewhere.received), (0, []))
        token = self.server.mint("admin")
        self.ok("run", "core.echo", "-w", "--notifier-url", url, env={"ATTUNE_API_TOKEN": token,
                                                                      "ATTUNE_API_URL": self.server.url})
        self.assertEqual(elsewhere.accepted, 1)
        self.assertIn(b"Authorization: Bearer " + token.encode(), elsewhere.received[0])
        for notifier, api, allowed in (
                ("wss://h:8081", "https://h", True), ("ws://h:8081", "https://h", False),
                ("wss://h", "http://h:8080", True), ("ws://H.:9", "http://h", True),
                ("ws://other", "http://h", False), ("wss://h.evil", "https://h", False),
                ("ws://[::1]:1", "http://[::1]:8080", True), ("ws://127.0.0.2", "http://127.0.0.1", False)):
            self.assertEqual(attune.notifier_may_carry(notifier, api), allowed, (notifier, api))

    def test_a_renewed_token_reopens_the_socket(self):
        eid = self.execute("core.sleep")
        session = types.SimpleNamespace(creds=types.SimpleNamespace(access=self.profile()["auth_token"]))
        tokens = [session.creds.access, self.server.mint("admin", "access", ttl=3600)]
        gets = []

        def fetch(method, path):
            gets.append(path)
            if len(gets) == 3:  # as if the session had refreshed before this request
                session.creds.access = tokens[1]
            if len(gets) == 5:
                with self.server.lock:
                    self.server.executions[eid]["status"] = "completed"
            return dict(self.server.executions[eid])
        session.fetch = fetch
        ctx = attune.Context(attune.parse_args(["execution", "watch", str(eid)]), self.environ())
        with mock.patch.object(attune, "NOTIFIER_POLL", 0.2):
            found = attune.notifier_wait(ctx, session, eid, "ws://127.0.0.1:%d" % self.server.port,
                                         time.monotonic() + 30, attune.WatchControls(ctx), attune.Progress(ctx))
        self.assertEqual(found["status"], "completed")
        self.assertEqual([ws["token"] for ws in self.server.ws_sessions], tokens)
        self.wait_until(lambda: all(ws["closed"] for ws in self.server.ws_sessions))
        self.assertEqual([ws["closed"] for ws in self.server.ws_sessions], ["client", "client"])

def frames(*parts):
    """Bytes a server might send: each part a (first byte, payload) frame or raw bytes."""
    out = b""
    for part in parts:
        if isinstance(part, bytes):
            out += part
            continue
        first, payload = part
        size = len(payload)
        out += bytes([first]) + (bytes([size]) if size < 126 else bytes([126]) + struct.pack(">H", size)
                                 if size < 65536 else bytes([127]) + struct.pack(">Q", size)) + payload
    return out


class WebSocketClientTests(unittest.TestCase):
    """attune.WebSocket against bytes on a socket pair: good frames read, pings answered,
    anything outside the protocol a WebSocketError (never a crash, never a hang)."""

    def receive(self, data):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.settimeout(2)
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        ws = attune.WebSocket(ours)
        return ws, theirs, ws.receive

    def test_good_messages(self):
        big = "x" * 70000
        for name, data, expected in [
                ("short", frames((0x81, b'{"a": 1}')), '{"a": 1}'),
                ("16-bit length", frames((0x81, b"y" * 300)), "y" * 300),
                ("64-bit length", frames((0x81, big.encode())), big),
                ("fragmented", frames((0x01, b"he"), (0x00, b"ll"), (0x80, b"o")), "hello"),
                ("pong ignored", frames((0x8A, b""), (0x81, b"after")), "after"),
                ("utf-8", frames((0x81, "Zoë ✓".encode())), "Zoë ✓")]:
            with self.subTest(name):
                self.assertEqual(self.receive(data)[2](), expected)

    def test_a_ping_is_answered_with_a_masked_pong(self):
        ws, theirs, receive = self.receive(frames((0x89, b"hi"), (0x81, b"next")))
        self.assertEqual(receive(), "next")
        pong = theirs.recv(100)
        self.assertEqual(pong[0], 0x8A)
        self.assertEqual(pong[1], 0x80 | 2)
        mask = pong[2:6]
        self.assertEqual(bytes(b ^ mask[i % 4] for i, b in enumerate(pong[6:])), b"hi")

    def test_hostile_frames(self):
        cases = [
            ("masked by the server", frames(bytes([0x81, 0x82]) + b"abcd" + b"xx")),
            ("reserved bits", frames((0xC1, b"x"))),
            ("a huge length", bytes([0x81, 127]) + struct.pack(">Q", 1 << 62)),
            ("over the limit", bytes([0x81, 127]) + struct.pack(">Q", attune.WEBSOCKET_MESSAGE_LIMIT + 1)),
            ("a long control frame", frames((0x89, b"p" * 126))),
            ("a fragmented control frame", frames((0x09, b"p"))),
            ("a continuation first", frames((0x80, b"x"))),
            ("text inside a fragmented message", frames((0x01, b"a"), (0x81, b"b"))),
            ("binary", frames((0x82, b"\x00\x01"))),
            ("an unknown opcode", frames((0x83, b""))),
            ("invalid UTF-8", frames((0x81, b"\xff\xfe"))),
            ("a close frame", frames((0x88, struct.pack(">H", 4401) + b"token expired"))),
            ("a bare close frame", frames((0x88, b""))),
            ("the end mid-header", b"\x81"),
            ("the end mid-payload", bytes([0x81, 10]) + b"abc"),
            ("nothing at all", b""),
        ]
        whole = frames((0x01, b"he"), (0x80, b"llo"))
        cases = [(name, data, False) for name, data in cases]
        cases += [("cut at %d" % size, whole[:size], False) for size in range(len(whole))]
        cases += [("random %d" % n, bytes(random.Random(n).randrange(256) for _ in range(60)), True)
                  for n in range(300)]
        for name, data, may_succeed in cases:
            with self.subTest(name):
                try:
                    got = self.receive(data)[2]()
                except (attune.WebSocketError, ValueError) as e:
                    self.assertNotIn("\x1b", str(e))
                else:
                    self.assertTrue(may_succeed, "%s gave %r" % (name, got))
        for deep in ("[" * 100000, '{"a":' * 100000):  # within the 1 MiB message limit
            with self.assertRaises(ValueError):
                attune.notifier_update(deep, 1)
            with self.assertRaisesRegex(attune.ApiError, "Failed to parse execution stream notification"):
                attune.merge_execution_update({}, deep, None)
        close = self.receive(frames((0x88, struct.pack(">H", 4401) + b"token \x1b[2J expired")))[2]
        with self.assertRaisesRegex(attune.WebSocketError, r"closed by the server \(4401 token \\x1b\[2J expired\)"):
            close()


class WatchControlTests(ResourceTestCase):
    """Ctrl+C cancels, Ctrl+D detaches: real processes, a real pseudo-terminal, real signals."""

    def setUp(self):
        super().setUp()
        self.slow = self.execute("core.sleep")  # runs until cancelled

    def on_terminal(self, *argv, foreground=True):
        """attune.py with a new pseudo-terminal as stdin (its controlling terminal, with the
        child in the foreground, unless foreground=False); (process, master, slave)."""
        import pty
        import termios
        import fcntl
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)

        def take_terminal():
            os.setsid()
            if foreground:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.mode_before = termios.tcgetattr(slave)  # before the child can change it
        process = self.spawn(*argv, stdin=slave, preexec_fn=take_terminal)
        return process, master, slave

    def subscribed(self, seconds=20):
        """Wait until the watch has subscribed to the notifier: it is in its wait."""
        deadline = time.monotonic() + seconds
        while not any(ws["filters"] for ws in self.server.ws_sessions):
            self.assertLess(time.monotonic(), deadline, self.targets())
            time.sleep(0.02)
        return [int(ws["filters"][0].rpartition(":")[2]) for ws in self.server.ws_sessions if ws["filters"]][0]

    def cancels(self, eid):
        return [t for t in self.targets() if t.startswith("POST /api/v1/executions/") and t.endswith("/cancel")]

    def test_ctrl_d_on_the_terminal_detaches_and_restores_it(self):
        import termios
        process, master, slave = self.on_terminal("execution", "watch", str(self.slow))
        before = self.mode_before
        self.assertEqual(process.stderr.readline(), "Ctrl+C requests cancellation; Ctrl+D detaches.\n")
        during = termios.tcgetattr(slave)
        self.assertFalse(during[3] & (termios.ICANON | termios.ECHO))
        self.assertTrue(during[3] & termios.ISIG)
        self.assertEqual(during[1], before[1])  # output processing (newlines) unchanged
        self.subscribed()
        os.write(master, b"some text\r")  # ordinary keys are ignored
        time.sleep(0.3)
        self.assertIsNone(process.poll())
        os.write(master, b"\x04")
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 0, err)
        self.assertEqual(out, "ℹ Observing execution %d...\nℹ Detached from execution %d. No cancellation was "
                              "requested.\n" % (self.slow, self.slow))
        self.assertEqual(self.cancels(self.slow), [])
        self.assertEqual(self.server.executions[self.slow]["status"], "running")
        self.assertEqual(termios.tcgetattr(slave), before)

    def test_sigterm_and_sighup_restore_the_terminal(self):
        """Killed politely in the middle of a watch: the terminal mode comes back, no cancel
        is sent (nobody asked for one), exit 143 or 129."""
        import termios
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            with self.subTest(signal=signum):
                self.server.ws_sessions.clear()
                process, master, slave = self.on_terminal("execution", "watch", str(self.slow))
                before = self.mode_before
                self.assertEqual(process.stderr.readline(), "Ctrl+C requests cancellation; Ctrl+D detaches.\n")
                self.subscribed()
                self.assertNotEqual(termios.tcgetattr(slave), before)  # keys are being read
                process.send_signal(signum)
                out, err = process.communicate(timeout=20)
                self.assertEqual(process.returncode, code, err)
                self.assertNotIn("Traceback", err)
                self.assertEqual(termios.tcgetattr(slave), before)
                self.assertEqual(self.cancels(self.slow), [])

    def test_ctrl_c_on_the_terminal_cancels_and_restores_it(self):
        import termios
        process, master, slave = self.on_terminal("run", "core.sleep", "-w")
        before = self.mode_before
        process.stderr.readline()
        eid = self.subscribed()
        os.write(master, b"\x03")  # the terminal turns it into SIGINT for its foreground group
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 130, err)
        self.assertTrue(out.endswith("ℹ Waiting for execution %d to complete...\n"
                                     "ℹ Cancellation requested for execution %d\n" % (eid, eid)), out)
        self.assertNotIn("error", err)
        self.assertEqual(self.cancels(eid), ["POST /api/v1/executions/%d/cancel" % eid])
        # canceling when it was running by then, cancelled when a loaded machine was slower
        self.assertIn(self.server.executions[eid]["status"], ("canceling", "cancelled"))
        self.assertEqual(termios.tcgetattr(slave), before)

    def test_a_timeout_on_the_terminal_restores_it(self):
        import termios
        process, master, slave = self.on_terminal("execution", "watch", str(self.slow), "--timeout", "1", "-j")
        before = self.mode_before
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertEqual(out, "")
        self.assertEqual(err.splitlines(), ["Ctrl+C requests cancellation; Ctrl+D detaches.",
                                            "attune: error: timed out after 1s waiting for execution %d "
                                            "(status 'running')" % self.slow])
        self.assertEqual(termios.tcgetattr(slave), before)
        self.assertEqual(self.cancels(self.slow), [])

    def test_a_terminal_that_is_not_ours_gives_no_keys(self):
        process, master, slave = self.on_terminal("execution", "watch", str(self.slow), "--timeout", "2",
                                                  foreground=False)
        self.subscribed()
        os.write(master, b"\x04\x03")
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertNotIn("Ctrl+D", err)
        self.assertIn("timed out after 2s waiting for execution %d" % self.slow, err)
        self.assertEqual(self.cancels(self.slow), [])

    def test_sigint_cancels_from_every_entry_point(self):
        """stdin /dev/null (no keys), JSON output, one cancel for the watched execution;
        also when the shell started attune.py with SIGINT ignored."""
        entries = [(["run", "core.sleep", "-w", "-j"], {}),
                   (["action", "execute", "core.sleep", "--watch", "-j"], {}),
                   (["execution", "rerun", str(self.slow), "--watch", "-j"], {}),
                   (["execution", "watch", str(self.slow), "-j"], {}),
                   (["run", "core.sleep", "-w", "-j"],
                    {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)})]
        for argv, kwargs in entries:
            with self.subTest(argv=argv, **{"ignored": bool(kwargs)}):
                del self.server.ws_sessions[:]
                del self.server.requests[:]
                process = self.spawn(*argv, **kwargs)
                eid = self.subscribed()
                process.send_signal(signal.SIGINT)
                out, err = process.communicate(timeout=20)
                self.assertEqual(process.returncode, 130, err)
                self.assertEqual(json.loads(out), {"execution_id": eid, "watch_status": "cancel_requested",
                                                   "execution_status": "canceling"})
                self.assertEqual(err, "")
                self.assertEqual(self.cancels(eid), ["POST /api/v1/executions/%d/cancel" % eid])
                self.assertEqual(self.sent("POST", "/api/v1/executions/%d/cancel" % eid).json(), {})
                if argv[1] != "watch":
                    self.assertNotEqual(eid, self.slow)
                self.server.executions[self.slow].update(status="running")

    def test_a_refused_or_slow_cancel_is_an_error(self):
        path = "/api/v1/executions/%d/cancel" % self.slow
        self.server.fail(path, "POST", *api_error(403, "Cancellation forbidden", "FORBIDDEN"))
        process = self.spawn("execution", "watch", str(self.slow))
        self.subscribed()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertNotIn("Cancellation requested", out)
        self.assertIn("attune: error: API error (403 Forbidden, code FORBIDDEN): Cancellation forbidden", err)
        del self.server.ws_sessions[:]
        self.server.fail(path, "POST", delay=3)
        process = self.spawn("execution", "watch", str(self.slow), "-j", env={"ATTUNE_TIMEOUT": "1"})
        self.subscribed()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertEqual(out, "")
        self.assertIn("attune: error: Cancellation request timed out; its server-side outcome is unknown", err)

    def test_closed_stdin_neither_detaches_nor_cancels(self):
        process = self.spawn("execution", "watch", str(self.slow), "--timeout", "1")
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertEqual(out, "ℹ Observing execution %d...\n" % self.slow)
        self.assertIn("timed out after 1s waiting for execution %d" % self.slow, err)
        self.assertEqual(self.cancels(self.slow), [])


class TtyText(io.StringIO):
    """Captured output that says it is a terminal."""

    def isatty(self):
        return True


class ListWatchTests(ResourceTestCase):
    """execution watch without an id: the list, then /executions/stream until all are done."""

    def streams(self):
        return [r for r in self.server.requests if r.path == "/api/v1/executions/stream"]

    def test_rows_follow_the_stream_until_every_execution_is_done(self):
        first = self.execute("core.sleep", "seconds=1")
        second = self.execute("core.sleep", "seconds=1")
        self.server.executions[second]["trace_tag"] = "nightly"
        result = self.ok("execution", "watch", "-a", "core.sleep", "--timeout", "30")
        lines = result.out.splitlines()
        self.assertEqual(lines[:4], ["Watching executions", "Press Ctrl+C to stop",
                                     "Filters: action=core.sleep scope=all limit=50", ""])
        self.assertEqual(lines[4].split(), ["ID", "Action", "Trace", "Tag", "Rule", "Trigger", "Status", "Created"])
        self.assertEqual([line.split()[:6] for line in lines[6:8]],
                         [[str(second), "core.sleep", "nightly", "-", "-", "requested"],
                          [str(first), "core.sleep", "-", "-", "-", "requested"]])
        updates = [line.split() for line in lines[8:-1]]
        for eid in (first, second):
            self.assertEqual([u[5] for u in updates if u[0] == str(eid)], ["scheduled", "running", "completed"])
        self.assertTrue(all(len(line) <= len(lines[5]) for line in lines[8:-1]))  # in the table's columns
        self.assertEqual(lines[-1], "✓ All watched executions are done")
        [stream] = self.streams()
        self.assertEqual(stream.headers["Accept"], "text/event-stream")
        self.assertEqual(stream.token, self.profile()["auth_token"])
        self.assertEqual(result.err, "")

    def test_a_terminal_is_redrawn_at_each_change(self):
        self.execute("core.echo", "message=x")
        screen = TtyText()
        with mock.patch.object(sys, "stdout", screen):
            code = attune.main(["execution", "watch", "--timeout", "30"], environ=self.environ())
        self.assertEqual(code, 0)
        frames = screen.getvalue().split("\x1b[2J\x1b[H")
        self.assertEqual(frames[0], "")
        self.assertEqual(len(frames), 1 + 4)  # requested, scheduled, running, completed
        self.assertIn("completed", frames[-1])
        self.assertTrue(frames[-1].endswith("✓ All watched executions are done\n"))

    @slow
    def test_status_filters_and_nothing_to_watch_yet(self):
        """Nothing matches yet: the watch follows the stream until an execution that matches
        starts, shows it, and ends when it is done, though a finished one has left the
        --status running view."""
        self.execute("core.echo")
        self.ok("execution", "watch", "-a", "core.echo", "--timeout", "30")  # let it finish first
        action = self.server.actions["core.sleep"]
        self.server.fail("/api/v1/executions/stream", effect=lambda: self.server.new_execution(action, {"seconds": 1}))
        result = self.ok("execution", "watch", "--status", "Running", "-s", "canceling", "--top-level-only",
                         "--pack", "core", "-l", "5", "--timeout", "30")
        lines = result.out.splitlines()
        self.assertEqual(lines[:4], [
            "Watching executions", "Press Ctrl+C to stop",
            "Filters: pack=core status=running,canceling scope=top-level limit=5", ""])
        header = lines[4]  # into a pipe: the header once, even over nothing yet, and rows aligned under it
        self.assertEqual(header.split(), ["ID", "Action", "Trace", "Tag", "Rule", "Trigger", "Status", "Created"])
        self.assertEqual(set(lines[5].replace(" ", "")), {"─"})
        [started] = [e["id"] for e in self.server.executions.values() if e["action_ref"] == "core.sleep"]
        self.assertEqual([line.split()[:2] + line.split()[5:6] for line in lines[6:-1]],
                         [[str(started), "core.sleep", "running"]])
        for line in lines[6:-1]:
            self.assertEqual(line.index(" running") + 1, header.index("Status"), lines)
            self.assertEqual(line.index("core.sleep"), header.index("Action"), lines)
        self.assertEqual(lines[-1], "✓ All watched executions are done")
        self.assertEqual(self.server.executions[started]["status"], "completed")
        self.assertEqual(len(self.streams()), 2)
        # nothing ever starts: it follows until --timeout
        result = self.fails(1, "execution", "watch", "--status", "running", "-a", "nope.nothing", "--timeout", "1")
        self.assertIn("timed out after 1s watching executions (0 not done)", result.err)

    @slow
    def test_polling_asks_for_an_execution_that_left_the_list(self):
        self.server.fail("/api/v1/executions/stream", "GET", *api_error(404, "Not Found", "NOT_FOUND"))
        eid = self.execute("core.sleep", "seconds=1")
        for _ in range(2):
            self.server.advance(eid)  # running
        stop = threading.Event()
        self.addCleanup(stop.set)

        def worker():  # from the moment the watch has listed it (then it asks for the stream)
            while not self.streams() and not stop.wait(0.02):
                pass
            while not stop.wait(0.3):
                self.server.advance(eid)
        threading.Thread(target=worker, daemon=True).start()
        with mock.patch.object(attune, "LIST_WATCH_POLL", 0.2):
            result = self.ok("execution", "watch", "--status", "running", "--timeout", "30")
        self.assertTrue(result.out.endswith("✓ All watched executions are done\n"))
        self.assertIn("GET /api/v1/executions/%d" % eid, self.targets())

    def test_usage_errors(self):
        self.assertIn("execution watch <id> observes a single execution and does not accept list-watch filters",
                      self.fails(2, "execution", "watch", "7", "--status", "running").err)
        self.fails(2, "execution", "watch", "7", "-l", "10")
        self.assertIn("execution watch without an id prints a table only",
                      self.fails(2, "execution", "watch", "-j").err)
        self.assertEqual(self.server.requests, [])

    def test_polling_when_the_stream_cannot_be_opened(self):
        eid = self.execute("core.sleep", "seconds=1")
        self.server.fail("/api/v1/executions/stream", "GET", *api_error(404, "Not Found", "NOT_FOUND"))
        stop = threading.Event()
        self.addCleanup(stop.set)

        def worker():  # the server's workers move it on, once the watch has asked for the stream: a
            while not self.streams() and not stop.wait(0.02):  # loaded machine could let it end unwatched
                pass
            while not stop.wait(0.3):
                self.server.advance(eid)
        threading.Thread(target=worker, daemon=True).start()
        with mock.patch.object(attune, "LIST_WATCH_POLL", 0.2):
            result = self.ok("execution", "watch", "-a", "core.sleep", "--timeout", "30")
        self.assertIn("attune: warning: Live stream unavailable (API error (404 Not Found, code NOT_FOUND): Not Found); "
                      "falling back to polling every 2s", result.err)
        self.assertEqual([line.split()[5] for line in result.out.splitlines()[6:-1]][-1], "completed")
        self.assertTrue(result.out.endswith("✓ All watched executions are done\n"))

    def test_a_dropped_stream_is_reopened_and_junk_is_an_error(self):
        self.execute("core.sleep", "seconds=1")
        self.server.stream_faults.append("drop")
        self.ok("execution", "watch", "--timeout", "30")
        self.assertEqual(len(self.streams()), 2)
        self.execute("core.sleep")
        for junk in ("not json", "[1]", '{"payload": 5}', '{"entity_id": "7", "payload": {}}', "[" * 50000,
                     '{"payload": {"id": true}}', "\x1b[2J"):
            with self.subTest(junk=junk):
                self.server.stream_faults.append(junk)
                result = self.fails(1, "execution", "watch", "--timeout", "30")
                self.assertEqual(result.err, "attune: error: Failed to parse execution stream notification\n")

    def test_timeout(self):
        eid = self.execute("core.sleep")
        result = self.fails(1, "execution", "watch", "--timeout", "1")
        self.assertIn("timed out after 1s watching executions (1 not done)", result.err)
        self.assertIn(str(eid), result.out)

    def test_a_renewed_token_reopens_the_stream(self):
        # The execution runs five seconds. attune.py's clock jumps 2,800 s once the stream is
        # open, which puts the token inside its 300 s refresh margin: the watch opened the
        # stream with it, then renews it and reopens the stream (an event, not a race).
        self.execute("core.sleep", "seconds=5")
        self.seed(access_left=3000)
        clock = lambda: time.time() + (2800 if self.streams() else 0)  # noqa: E731
        self.ok("execution", "watch", "--timeout", "30", clock=clock)
        tokens = [r.token for r in self.streams()]
        self.assertGreaterEqual(len(tokens), 2)
        self.assertEqual(len(set(tokens)), len(tokens))
        self.assertEqual(tokens[-1], self.profile()["auth_token"])

    def test_ctrl_c_ends_it_with_130(self):
        self.execute("core.sleep")
        process = self.spawn("execution", "watch")
        deadline = time.monotonic() + 20
        while not self.streams():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 130, err)
        self.assertIn("Watching executions", out)
        self.assertEqual(err.strip(), "attune: interrupted")


class InfoTests(AttuneTestCase):
    def test_local_makes_no_request(self):
        result = self.ok("info", "--local")
        self.assertEqual(result.out, "Local binary:   attune.py\nLocal version:  %s\nLocal Git SHA:  unknown\n"
                         % attune.__version__)
        self.assertEqual(self.ok("info", "--local", "-j").json(),
                         {"binary": "attune.py", "version": attune.__version__, "git_sha": "unknown"})
        self.assertEqual(self.server.requests, [])

    def test_the_server_build_needs_no_login(self):
        env = {"ATTUNE_API_URL": self.server.url + "/"}
        result = self.ok("info", env=env)
        self.assertEqual(result.out.split("\n\n")[1], "Server profile:  default\nServer API:      %s\n"
                         "Server version:  0.9.3\nServer Git SHA:  3f2a9c1\n" % self.server.url)
        self.assertEqual(self.ok("info", "-j", env=env).json(), {
            "local": {"binary": "attune.py", "version": attune.__version__, "git_sha": "unknown"},
            "server": {"status": "connected", "profile": "default", "api_url": self.server.url,
                       "version": "0.9.3", "git_sha": "3f2a9c1"}})
        [req] = [r for r in self.server.requests if r.method == "GET"][-1:]
        self.assertEqual(req.target, "/api/v1/info")
        self.assertIsNone(req.token)

    def test_an_unreachable_server_is_reported_then_fails(self):
        port = free_port()
        result = self.fails(5, "info", "-j", env={"ATTUNE_API_URL": "http://127.0.0.1:%d/attune" % port})
        server = result.json()["server"]
        self.assertEqual(server["status"], "unavailable")
        self.assertEqual(server["api_url"], "http://127.0.0.1:%d" % port)
        self.assertIn("127.0.0.1", server["error"])
        self.assertEqual(result.err, "attune: error: Could not fetch server build information\n")
        self.server.fail("/api/v1/info", status=500, body={"error": "boom", "code": "INTERNAL_ERROR"}, times=None)
        result = self.fails(6, "info", env={"ATTUNE_API_URL": self.server.url})
        self.assertIn("Server error:    API error (500 Internal Server Error, code INTERNAL_ERROR): boom", result.out)


class ErrorLineTests(ResourceTestCase):
    def test_the_error_code_and_request_id(self):
        cases = [
            ({"x-request-id": "req-1"}, {"error": "Pack 'x' not found", "code": "NOT_FOUND"},
             "API error (404 Not Found, code NOT_FOUND, request ID req-1): Pack 'x' not found"),
            ({"X-Attune-Request-Id": "a-2", "request-id": "later"}, {"error": "nope"},
             "API error (404 Not Found, request ID a-2): nope"),
            ({"Request-ID": "r3"}, {"error": {"code": 404, "message": "gone"}}, "API error (404 Not Found, request ID r3): gone"),
            ({"x-request-id": "bad\x1b[2Jid"}, {"error": "x", "code": "C\x07D"}, "API error (404 Not Found): x"),
            ({}, {"error": "y", "code": 17}, "API error (404 Not Found): y"),
            ({"x-request-id": "r" * 300}, {"error": "z", "code": "K" * 100},
             "API error (404 Not Found, code %s%s, request ID %s%s): z" % ("K" * 63, "…", "r" * 127, "…")),
        ]
        for headers, body, expected in cases:
            with self.subTest(expected=expected):
                self.server.fail("/api/v1/packs/x", status=404, body=body, headers=headers)
                result = self.fails(1, "pack", "show", "x")
                self.assertEqual(result.err, "attune: error: %s\n" % expected)


class InquiryCommandTests(ResourceTestCase):
    def test_list_table_json_and_filters(self):
        lines = self.lines("inquiry", "list")
        self.assertEqual(lines[0].split(), ["ID", "Status", "Prompt", "Created", "by", "Assigned", "to", "Created"])
        self.assertEqual([line.split()[:2] for line in lines[2:]], [["1", "pending"], ["2", "responded"], ["3", "pending"]])
        self.assertIn("Deploy build 42 to production?", lines[2])
        self.assertEqual(self.targets(), ["GET /api/v1/inquiries?offset=0&limit=50"])
        data = self.ok("inquiry", "list", "--status", "pending", "--created-by-execution", "7", "--assigned-to", "3",
                       "--offset", "0", "--limit", "500", "-j").json()
        self.assertEqual(self.targets()[-1], "GET /api/v1/inquiries?offset=0&limit=500&status=pending"
                                             "&created_by_execution=7&assigned_to=3")
        self.assertEqual([i["id"] for i in data["items"]], [3])
        self.assertEqual(data["pagination"], {"page": 1, "page_size": 500, "has_previous": False, "has_next": False})
        self.assertEqual(self.lines("inquiry", "list", "--status", "timeout"), [
            "ID  Status  Prompt  Created by  Assigned to  Created", "──  ──────  ──────  ──────────  ───────────  ───────"])
        result = self.ok("inquiry", "list", "--limit", "1", "--offset", "1")
        self.assertIn("showing the first 1 inquiry;", result.err)
        for bad in (["--limit", "0"], ["--limit", "501"], ["--offset", "-1"], ["--status", "open"]):
            self.fails(2, "inquiry", "list", *bad)

    def test_show(self):
        self.assertEqual(self.lines("inquiry", "show", "1")[:9], [
            "ID:                1", "Status:            pending", "Prompt:            Deploy build 42 to production?",
            "Purpose:           approval", "Created by:        7", "Assigned to:       -",
            'Response schema:   {"type":"object","properties":{"approved":{"type":"boolean"}},"required":["approved"]}',
            'Response options:  [{"ref":"approve","label":"Approve","style":"primary","response":{"approved":true}},'
            '{"ref":"reject","label":"Reject","style":"danger","response":{"approved":false}}]',
            "Response:          -"])
        self.assertEqual(self.ok("inquiry", "show", "2", "-j").json()["response"], {"region": "eu"})
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Inquiry with ID 99 not found",
                      self.fails(1, "inquiry", "show", "99").err)

    def test_respond_with_an_option_or_json(self):
        result = self.ok("inquiry", "respond", "1", "--option", "approve")
        self.assertIn("Status:            responded", result.out)
        self.assertIn('Response:          {"approved":true}', result.out)
        self.assertEqual(self.targets(), ["GET /api/v1/inquiries/1", "POST /api/v1/inquiries/1/respond"])
        self.assertEqual(self.server.requests[-1].json(), {"response": {"approved": True}})
        self.assertIn("API error (409 Conflict, code CONFLICT): Inquiry is no longer pending",
                      self.fails(1, "inquiry", "respond", "1", "--response-json", '{"approved": false}').err)
        self.assertIn("Inquiry 3 is assigned to identity 3", self.fails(1, "inquiry", "respond", "3",
                                                                      "--response-json", "{}").err)
        self.server.inquiries[1]["status"] = "pending"
        self.assertRegex(self.fails(1, "inquiry", "respond", "1", "--response-json", '{"ok": 1}').err,
                         r"API error \(422 Unprocessable \w+, code UNPROCESSABLE_ENTITY\): Response does not "
                         r"match the inquiry's schema")  # the reason phrase changed in Python 3.13
        data = self.ok("inquiry", "respond", "1", "--response-json", '{"approved": false, "note": "not today"}',
                       "-j").json()
        self.assertEqual(data["response"], {"approved": False, "note": "not today"})

    def test_respond_usage_errors(self):
        cases = [([], "give exactly one of --option REF and --response-json JSON"),
                 (["--option", "a", "--response-json", "{}"], "give exactly one of"),
                 (["--response-json", "{nope"], "--response-json must contain valid JSON"),
                 (["--response-json", "[" * 100000], "--response-json must contain valid JSON"),
                 (["--response-json", "[1]"], "Inquiry response must be a JSON object")]
        for extra, message in cases:
            with self.subTest(extra=extra):
                self.assertIn(message, self.fails(2, "inquiry", "respond", "1", *extra).err)
        self.assertIn("Inquiry 1 has no response option with ref 'maybe'",
                      self.fails(1, "inquiry", "respond", "1", "--option", "maybe").err)
        self.assertEqual([r.method for r in self.server.requests], ["GET"])

    def test_execution_create_and_cancel_need_the_execution_token(self):
        request = os.path.join(self.tmp, "inquiry.json")
        with open(request, "w") as f:
            json.dump({"prompt": "Roll back?", "purpose": "approval"}, f)
        self.assertIn("Workflow inquiries must be created with an execution token",
                      self.fails(1, "inquiry", "execution", "create", "--request-file", request).err)
        token = self.server.mint("admin", "execution", ttl=600, execution_id=55)
        env = {"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": self.server.url}
        created = self.ok("inquiry", "execution", "create", "--request-file", request, "-j", env=env).json()
        self.assertEqual(created["inquiry"]["prompt"], "Roll back?")
        self.assertEqual(created["inquiry"]["created_by_execution"], 55)
        self.assertEqual(self.server.requests[-1].json(), {"prompt": "Roll back?", "purpose": "approval"})
        table = self.ok("inquiry", "execution", "create", "--request-file", "-", env=env,
                        stdin='{"prompt": "Again?"}').out
        self.assertEqual(json.loads(table)["inquiry"]["prompt"], "Again?")
        iid = created["inquiry"]["id"]
        self.assertIn("Only the execution that created an inquiry can cancel it",
                      self.fails(1, "inquiry", "execution", "cancel", str(iid)).err)
        self.assertIn("Status:            cancelled", self.ok("inquiry", "execution", "cancel", str(iid), env=env).out)
        self.assertEqual(self.server.requests[-1].json(), {})
        with open(request, "w") as f:
            f.write("# YAML too\nprompt: Deploy?\nresponse_options:\n  - {ref: yes, response: {ok: true}}\n")
        self.ok("inquiry", "execution", "create", "--request-file", request, "-j", env=env)
        self.assertEqual(self.server.requests[-1].json(), {"prompt": "Deploy?", "response_options": [
            {"ref": "yes", "response": {"ok": True}}]})
        for content, message in (("{bad", "Invalid inquiry request: %s:1:1: this mapping never ends" % request),
                                 ("a: 1\na: 2", "Invalid inquiry request: %s:2:1: duplicate key" % request),
                                 ("[]", "Inquiry create request must be a JSON object")):
            with open(request, "w") as f:
                f.write(content)
            self.assertIn(message, self.fails(2, "inquiry", "execution", "create", "--request-file", request).err)
        self.assertIn("Failed to read inquiry request", self.fails(
            2, "inquiry", "execution", "create", "--request-file", os.path.join(self.tmp, "missing.json")).err)
        self.assertIn("inquiry execution needs a command", self.fails(2, "inquiry", "execution").err)


class ArtifactCommandTests(ResourceTestCase):
    def test_list(self):
        lines = self.lines("artifact", "list")
        self.assertEqual(lines[0].split(), ["Ref", "Name", "Type", "Visibility", "Size", "Created", "ID"])
        self.assertEqual(lines[2].split()[:5], ["core.echo.stdout.log", "stdout", "file_text", "private", "12"])
        self.assertEqual(lines[3].split()[:4], ["reports.summary", "-", "file_datatable", "public"])
        self.assertEqual(lines[-1], "ℹ 2 artifact(s)")
        self.assertEqual(self.targets(), ["GET /api/v1/artifacts?page=1&per_page=50"])
        items = self.ok("artifact", "list", "--scope", "action", "--owner", "core echo", "--type", "file_text",
                        "--visibility", "private", "--execution", "5", "--name", "out", "--page", "2",
                        "--per-page", "10", "-j").json()
        self.assertEqual(items, [])
        self.assertEqual(self.targets()[-1], "GET /api/v1/artifacts?page=2&per_page=10&scope=action&owner=core+echo"
                                             "&type=file_text&visibility=private&execution=5&name=out")
        self.assertEqual(self.ok("artifact", "list", "--owner", "nobody").out, "ℹ No artifacts found\n")
        self.assertEqual(self.ok("artifact", "list", "-j").json()[0]["ref"], "core.echo.stdout.log")

    def test_show_by_id_or_ref(self):
        lines = self.lines("artifact", "show", "1")
        self.assertEqual(lines[:2], ["Artifact: core.echo.stdout.log", "─" * 30])
        self.assertIn("Retention:     versions (limit: 5)", lines)
        self.assertIn("Size:          12 B", lines)
        self.ok("artifact", "show", "reports.summary")
        self.assertEqual(self.targets(), ["GET /api/v1/artifacts/1", "GET /api/v1/artifacts/ref/reports.summary"])
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Artifact 'a/b' not found",
                      self.fails(1, "artifact", "show", "a/b").err)
        self.assertEqual(self.targets()[-1], "GET /api/v1/artifacts/ref/a%2Fb")

    def test_create_and_delete(self):
        result = self.ok("artifact", "create", "--ref", "builds.log", "--owner", "ci.build", "--name", "Build log")
        self.assertTrue(result.out.startswith("✓ Artifact 'builds.log' created successfully\n"))
        self.assertEqual(self.server.requests[-1].json(), {
            "ref": "builds.log", "scope": "action", "owner": "ci.build", "type": "file_text",
            "retention_policy": "versions", "retention_limit": 5, "name": "Build log"})
        self.assertIn("API error (409 Conflict, code CONFLICT): Artifact with ref 'builds.log' already exists",
                      self.fails(1, "artifact", "create", "--ref", "builds.log", "--owner", "x").err)
        self.assertIn("add --yes", self.fails(2, "artifact", "delete", "3").err)
        self.assertEqual(self.ok("artifact", "delete", "3", "--yes").out, "✓ Artifact 3 deleted successfully\n")
        self.assertEqual(self.targets()[-1], "DELETE /api/v1/artifacts/3")
        self.assertNotIn(3, self.server.artifacts)

    def test_download_names_and_force(self):
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, os.path.dirname(os.path.abspath(ATTUNE_PY)))
        result = self.ok("artifact", "download", "1")
        self.assertEqual(result.out, "✓ Downloaded latest version to 'core_echo_stdout_log_v2.txt' (12 B)\n")
        with open(os.path.join(self.tmp, "core_echo_stdout_log_v2.txt"), "rb") as f:
            self.assertEqual(f.read(), b"hello again\n")
        self.assertEqual(self.server.requests[-1].headers["Accept"], "*/*")
        self.assertIn("exists; add --force", self.fails(2, "artifact", "download", "1").err)
        target = os.path.join(self.tmp, "v1.log")
        data = self.ok("artifact", "download", "1", "-V", "1", "-o", target, "-j").json()
        self.assertEqual(data, {"artifact_id": 1, "version": 1, "path": target, "size_bytes": 12})
        self.assertIn("exists; add --force", self.fails(2, "artifact", "version", "download", "1", "2", "-o", target).err)
        self.ok("artifact", "version", "download", "1", "2", "-o", target, "--force")
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"hello again\n")
        self.assertEqual(self.targets()[-1], "GET /api/v1/artifacts/1/versions/2/download")
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), new_file_mode())
        self.assertIn("Artifact 2 has no versions", self.fails(1, "artifact", "download", "2").err)

    def test_an_output_format_after_download_is_written_as_a_file_with_a_warning(self):
        """`artifact download 1 -o json`: -o there is the download's own (a path), so the file
        is named json, and a warning says so and where the format goes; before the command,
        -o json is the format."""
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, os.path.dirname(os.path.abspath(ATTUNE_PY)))
        for word, argv in (("json", ["artifact", "download", "1"]), ("yaml", ["artifact", "version", "download", "1",
                                                                               "2"])):
            result = self.ok(*argv + ["-o", word])
            self.assertEqual(result.err, "attune: warning: writing a file named '%s': after `%s`, -o is the file to write; the output "
                             "format goes before the command (attune -o %s %s ...)\n"
                             % (word, " ".join(argv[:-1] if word == "json" else argv[:-2]), word,
                                " ".join(argv[:-1] if word == "json" else argv[:-2])))
            self.assertTrue(os.path.isfile(os.path.join(self.tmp, word)))
        data = json.loads(self.ok("-o", "json", "artifact", "download", "1", "-o", "v.log").out)
        self.assertEqual(data["path"], "v.log")
        self.assertEqual(self.ok("artifact", "download", "1", "-o", "plain.log").err, "")

    def test_hostile_file_names_fall_back_to_a_safe_one(self):
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, os.path.dirname(os.path.abspath(ATTUNE_PY)))
        for disposition in ('attachment; filename="../../etc/passwd"', 'attachment; filename="/tmp/x"',
                            'attachment; filename=".bashrc"', 'attachment; filename="a\\\\b"', "attachment",
                            'attachment; filename="x\x1b[2J"', 'attachment; filename=".."', 'attachment; filename=""'):
            with self.subTest(disposition=disposition):
                self.server.fail("/api/v1/artifacts/1/download", status=200, body=b"data",
                                 headers={"Content-Type": "application/json", "Content-Disposition": disposition})
                result = self.ok("artifact", "download", "1", "--force")
                self.assertEqual(result.out, "✓ Downloaded latest version to 'artifact_1_latest.json' (4 B)\n")
        self.server.fail("/api/v1/artifacts/1/download", status=200, body=b"data",
                         headers={"Content-Disposition": 'attachment; filename="build report.txt"'})
        self.ok("artifact", "download", "1")
        self.assertEqual(sorted(os.listdir(self.tmp)), ["artifact_1_latest.json", "build report.txt", "home"])

    def test_an_interrupted_download_leaves_no_file(self):
        target = os.path.join(self.tmp, "out.txt")
        for existing in (None, b"old contents\n"):
            if existing is not None:
                with open(target, "wb") as f:
                    f.write(existing)
            self.server.fail("/api/v1/artifacts/1/download", status=200, body=b"partial", truncate=True,
                             headers={"Content-Type": "text/plain"})
            result = self.fails(5, "artifact", "download", "1", "-o", target, "--force")
            self.assertIn("the download broke off after 7 B", result.err)
            self.assertEqual(os.listdir(self.tmp), ["home"] + (["out.txt"] if existing else []))
            if existing:
                with open(target, "rb") as f:
                    self.assertEqual(f.read(), existing)

    def test_download_into_a_place_that_cannot_take_it(self):
        for target in (self.tmp, os.path.join(self.tmp, "missing", "x.txt")):
            with self.subTest(target=target):
                self.assertIn("cannot write", self.fails(1, "artifact", "download", "1", "-o", target, "--force").err)
        self.assertEqual(os.listdir(self.tmp), ["home"])

    def test_download_to_stdout(self):
        result = self.run_process("artifact", "download", "1", "-V", "1", "-o", "-")
        self.assertEqual((result.code, result.out), (0, "hello world\n"))

    def test_versions(self):
        lines = self.lines("artifact", "version", "list", "1")
        self.assertEqual(lines[0].split(), ["ID", "Version", "Content", "Type", "Size", "File", "Path", "Created", "By",
                                            "Created"])
        self.assertEqual([line.split()[1] for line in lines[2:4]], ["v2", "v1"])
        self.assertEqual(lines[-1], "ℹ 2 version(s) for artifact 1")
        self.assertEqual(self.ok("artifact", "version", "list", "2").out, "ℹ No versions found for artifact 2\n")
        shown = self.lines("artifact", "version", "show", "1", "2")
        self.assertEqual(shown[0], "Version 2 of Artifact 1")
        self.assertIn("Storage:         Database", shown)
        result = self.ok("artifact", "version", "create-json", "2", '{"rows": 3}', "--meta", '{"source": "ci"}',
                         "--created-by", "ci")
        self.assertTrue(result.out.startswith("✓ JSON version 1 created successfully\n"))
        self.assertEqual(self.server.requests[-1].json(), {"content": {"rows": 3}, "meta": {"source": "ci"},
                                                           "created_by": "ci"})
        self.assertIn("Invalid content JSON", self.fails(2, "artifact", "version", "create-json", "2", "{x").err)
        self.assertIn("Invalid meta JSON", self.fails(2, "artifact", "version", "create-json", "2", "1",
                                                      "--meta", "{x").err)
        self.assertEqual(self.ok("artifact", "version", "delete", "1", "1", "--yes").out,
                         "✓ Version 1 of artifact 1 deleted successfully\n")
        self.assertEqual([v["version"] for v in self.server.artifact_versions[1]], [2])
        self.assertIn("artifact version needs a command", self.fails(2, "artifact", "version").err)

    def test_upload(self):
        path = os.path.join(self.tmp, "report.csv")
        with open(path, "wb") as f:
            f.write(b"a,b\n1,2\n")
        result = self.ok("artifact", "upload", "2", path, "--meta", '{"run": 7}', "--created-by", "me")
        self.assertEqual(result.out.splitlines()[:2], ["ℹ Uploading 'report.csv' (8 B) to artifact 2...",
                                                       "✓ Version 1 uploaded successfully"])
        fields, files = parse_multipart(self.server.requests[-1].body, self.server.requests[-1].headers["Content-Type"])
        self.assertEqual(files["file"], ("report.csv", "text/csv", b"a,b\n1,2\n"))
        self.assertEqual(fields, {"created_by": "me", "meta": '{"run": 7}'})
        self.ok("artifact", "version", "upload", "2", path, "--content-type", "text/plain")
        self.assertEqual(self.server.artifact_versions[2][-1]["content_type"], "text/plain")
        self.assertIn("cannot read", self.fails(2, "artifact", "upload", "2", os.path.join(self.tmp, "nope")).err)
        self.assertIn("Invalid meta JSON", self.fails(2, "artifact", "upload", "2", path, "--meta", "{").err)

    def test_human_sizes(self):
        for size, text in ((0, "0 B"), (1023, "1023 B"), (1024, "1.0 KB"), (1536, "1.5 KB"), (1 << 20, "1.0 MB"),
                           (5 * (1 << 30) // 2, "2.50 GB"), (None, "-"), ("x", "x")):
            self.assertEqual(attune.human_size(size), text)


class ChangePasswordTests(ResourceTestCase):
    """auth change-password: the passwords only on stdin or a terminal, the server's length
    rule first, a refused current password never mistaken for an expired session."""
    NEW = "n3w-Admin-passw0rd"

    def change(self, current, new, *extra, code=0):
        return self.fails(code, "auth", "change-password", "--password-stdin", *extra,
                          stdin="%s\n%s\n" % (current, new))

    def test_change_then_the_session_goes_on_and_the_new_password_logs_in(self):
        self.extra_secrets = {self.NEW}
        before = self.profile()
        result = self.change(PASSWORD, self.NEW)
        self.assertIn("Password changed for 'admin'", result.out)
        self.assertEqual(self.sent("POST", "/auth/change-password").json(),
                         {"current_password": PASSWORD, "new_password": self.NEW})
        self.assertEqual(self.server.password_changes, ["admin"])
        self.assertEqual(self.profile(), before)  # the session is the same one, and still works
        self.ok("pack", "list")
        self.ok("auth", "login", "-u", "admin", "--password-stdin", stdin=self.NEW + "\n")
        self.assertEqual(self.change(self.NEW, PASSWORD, "-j").json(), {"login": "admin", "changed": True})

    def test_a_refused_current_password_is_exit_4_and_changes_nothing(self):
        before = self.read_doc()
        result = self.change("not-the-password", self.NEW, code=4)
        self.assertIn("the server refused the current password of 'admin' (Invalid current password); the "
                      "password is unchanged", result.err)
        self.assertNotIn("expired", result.err)
        self.assertNotIn("auth login", result.err)
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)  # not a token problem
        self.assertEqual(self.server.count("POST", "/auth/change-password"), 1)  # and not sent again
        self.assertEqual(self.read_doc(), before)
        self.assertEqual(self.server.password_changes, [])

    def test_if_needed_when_the_new_password_is_already_in_place(self):
        self.extra_secrets = {self.NEW}
        self.change(PASSWORD, self.NEW, "--if-needed")
        self.server.requests.clear()
        again = self.change(PASSWORD, self.NEW, "--if-needed", "-j")  # the bootstrap run a second time
        self.assertEqual(again.json(), {"login": "admin", "changed": False})
        self.assertEqual(self.server.password_changes, ["admin"])
        self.assertEqual(self.server.count("POST", "/auth/login"), 1)  # the new password checked, nothing stored
        self.change("wrong-old-pass", "wrong-new-pass", "--if-needed", code=4)  # neither works: refused

    def test_bad_input_is_refused_before_any_request(self):
        cases = [("", self.NEW, "no current password on standard input"),
                 (PASSWORD, "", "no new password on standard input"),
                 (PASSWORD, "short", "the new password must be 8 to 128 characters long (it has 5)"),
                 (PASSWORD, "x" * 129, "the new password must be 8 to 128 characters long (it has 129)"),
                 (PASSWORD, PASSWORD, "the new password is the current one")]
        for current, new, message in cases:
            with self.subTest(new=new[:10]):
                self.assertIn(message, self.change(current, new, code=2).err)
        self.assertIn("there is no terminal to ask on; use --password-stdin",
                      self.fails(2, "auth", "change-password").err)
        self.assertEqual(self.server.requests, [])

    def test_the_server_refusing_for_its_own_reasons(self):
        self.server.identities[1]["frozen"] = True
        self.assertIn("Identity is frozen and cannot change its password", self.change(PASSWORD, self.NEW, code=1).err)
        self.fails(4, "auth", "change-password", "--password-stdin", stdin="a\nb-long-enough\n",
                   env={"ATTUNE_API_TOKEN": "not-a-token"})  # no session at all: the usual exit 4

    def test_a_prompt_asks_for_the_new_password_twice(self):
        answers = iter([PASSWORD, self.NEW, self.NEW])
        with mock.patch.object(attune, "can_prompt", return_value=True), \
                mock.patch("getpass.getpass", side_effect=lambda prompt, stream=None: next(answers)):
            self.extra_secrets = {self.NEW}
            self.ok("auth", "change-password")
        answers = iter([self.NEW, "another-passw0rd", "a-typo-passw0rd"])
        with mock.patch.object(attune, "can_prompt", return_value=True), \
                mock.patch("getpass.getpass", side_effect=lambda prompt, stream=None: next(answers)):
            self.assertIn("the two new passwords differ", self.fails(2, "auth", "change-password").err)
        self.assertEqual(self.server.password_changes, ["admin"])


class LoginNameTests(AttuneTestCase):
    def test_attune_login_is_read_like_username(self):
        """ATTUNE_LOGIN (the Rust tools' variable) names the login; -u outranks it; the stored
        username comes after both."""
        env = {"ATTUNE_LOGIN": "zoe", "ATTUNE_PASSWORD": "zoe-pass"}
        self.ok("auth", "login", "--url", self.server.url, env=env)
        self.assertEqual([r.json()["login"] for r in self.server.requests if r.path == "/auth/login"], ["zoe"])
        self.assertEqual(self.profile()["username"], "zoe")
        self.ok("auth", "login", "-u", "admin", "--password-stdin", stdin=PASSWORD + "\n", env={"ATTUNE_LOGIN": "zoe"})
        self.ok("auth", "login", "--password-stdin", stdin="zoe-pass\n", env={"ATTUNE_LOGIN": "zoe"})
        self.assertEqual([r.json()["login"] for r in self.server.requests if r.path == "/auth/login"],
                         ["zoe", "admin", "zoe"])
        self.assertEqual(self.profile()["username"], "zoe")


SENSOR_SCRIPT = r"""
import sys
import attune
api = attune.session()
while sys.stdin.readline():  # one request for each line the test writes: it rotates the file in between
    print(api.get("/auth/me")["login"], api.creds.source, flush=True)
"""


class InsideAttuneTests(AttuneTestCase):
    """Inside Attune: the managed sensor's token state file first and read for every request,
    the environment's token as its fallback, platform tokens never refreshed, and messages that
    say Attune issues them."""

    def state(self, token, expires_at=None, keys=("token", "expires_at"), path=None):
        """Write the state file as the sensor runtime does: a new file renamed over the old."""
        path = path or os.path.join(self.tmp, "sensor-token.json")
        doc = {keys[0]: token}
        if expires_at is not None:
            doc[keys[1]] = expires_at
        with open(path + ".new", "w") as f:
            json.dump(doc, f)
        os.replace(path + ".new", path)
        return path

    def sensor_env(self, path, **extra):
        env = {"ATTUNE_API_URL": self.server.url, "ATTUNE_SENSOR_TOKEN_STATE_PATH": path,
               "ATTUNE_SENSOR_REF": "core.timer"}
        env.update(extra)
        return env

    def test_rfc3339_and_epoch_expiries_by_a_generated_table(self):
        import calendar
        import random
        rng = random.Random(28)
        for _ in range(500):
            moment = rng.randrange(-2 * 10 ** 9, 5 * 10 ** 9)
            offset = rng.choice([0, 3600, -18000, 19800, 50400, -43200])
            shifted = time.gmtime(moment + offset)
            zone = "Z" if offset == 0 and rng.random() < 0.5 else "%s%02d:%02d" % (
                "+" if offset >= 0 else "-", abs(offset) // 3600, abs(offset) % 3600 // 60)
            fraction = rng.choice(["", ".5", ".123456", ".000000001"])
            text = time.strftime("%Y-%m-%dT%H:%M:%S", shifted) + fraction + zone
            with self.subTest(text=text):
                self.assertEqual(attune.time_epoch(text), calendar.timegm(time.gmtime(moment)))
                self.assertEqual(attune.time_epoch(text.lower()), moment)
        self.assertEqual(attune.time_epoch("1767225600"), 1767225600)
        self.assertEqual(attune.time_epoch(1767225600.5), 1767225600)
        for bad in ("", "soon", "2026-12-31", "2026-12-31T00:00:00", "2026-13-01T00:00:00Z", "2026-12-32T00:00:00Z",
                    "2026-12-31T24:00:00Z", "2026-12-31T00:60:00Z", "2026-12-31T00:00:00+2", "2026-1x-31T00:00:00Z",
                    "2026-12-31T00:00:00.Z1", "99999999999999", None, True, [], "2026-12-31T00:00Z", "\u0661\u0662"):
            with self.subTest(bad=bad):
                self.assertIsNone(attune.time_epoch(bad))

    def test_the_state_file_comes_first_and_names_itself(self):
        sensor = self.server.mint("admin", "sensor")
        fallback = self.server.mint("admin")
        path = self.state(sensor, "2099-01-01T00:00:00Z")
        env = self.sensor_env(path, ATTUNE_API_TOKEN=fallback)
        self.ok("pack", "list", env=env)
        self.assertEqual(self.server.requests[-1].token, sensor)
        got = self.ok("auth", "token", "--format", "json", env=env, secrets_ok=True).json()
        self.assertEqual((got["token"], got["source"], got["source_detail"], got["expires_at"]),
                         (sensor, "state_file", path, 4070908800))
        status = self.ok("auth", "status", env=env).out
        self.assertIn("token state file %s (ATTUNE_SENSOR_TOKEN_STATE_PATH)" % path, status)
        aliased = self.state(sensor, "2099-01-01T00:00:00+01:00", keys=("api_token", "token_expires_at"))
        got = self.ok("auth", "token", "--format", "json", env=self.sensor_env(aliased), secrets_ok=True).json()
        self.assertEqual((got["token"], got["expires_at"]), (sensor, 4070905200))
        stored = self.seed()["auth_token"]  # -p: the stored session, as with every environment token
        got = self.ok("-p", "default", "auth", "token", "--format", "json", env=env, secrets_ok=True).json()
        self.assertEqual((got["token"], got["source"]), (stored, "file"))

    def test_an_unreadable_state_file_falls_back_to_the_environment_token(self):
        fallback = self.server.mint("admin")
        path = os.path.join(self.tmp, "sensor-token.json")
        for content in (None, "", "{not json", "[]", '{"token": ""}', '{"expires_at": "2099-01-01T00:00:00Z"}',
                        '{"token": "bad token with spaces"}', "\xff\xfe"):
            with self.subTest(content=content):
                if content is None:
                    if os.path.exists(path):
                        os.remove(path)
                else:
                    with open(path, "w", encoding="latin-1") as f:
                        f.write(content)
                self.ok("auth", "whoami", env=self.sensor_env(path, ATTUNE_API_TOKEN=fallback))
                self.assertEqual(self.server.requests[-1].token, fallback)
                got = self.ok("auth", "token", "--format", "json", env=self.sensor_env(path, ATTUNE_API_TOKEN=fallback),
                              secrets_ok=True).json()
                self.assertEqual((got["source"], got["source_detail"]), ("env", "ATTUNE_API_TOKEN"))
                result = self.fails(3, "auth", "whoami", env=self.sensor_env(path))
                self.assertIn("token state file %s (ATTUNE_SENSOR_TOKEN_STATE_PATH)" % path, result.err)
                self.assertIn("and ATTUNE_API_TOKEN holds no token to use instead", result.err)

    def test_platform_tokens_are_never_refreshed_and_expiry_says_who_issues_them(self):
        now = int(time.time())
        expired = self.server.mint("admin", "sensor", ttl=3600, iat=now - 4000)
        refresh = self.server.mint("admin", "refresh")
        self.seed()  # a stored session too: it must not be touched either
        before = self.read_doc()
        cases = [("state file", self.sensor_env(self.state(expired)), "sensor core.timer",
                  "token state file"),
                 ("execution token", {"ATTUNE_API_URL": self.server.url, "ATTUNE_API_TOKEN": expired,
                                      "ATTUNE_EXEC_ID": "42"}, "execution 42", "environment (ATTUNE_API_TOKEN)"),
                 ("sensor token", {"ATTUNE_API_URL": self.server.url, "ATTUNE_API_TOKEN": expired,
                                   "ATTUNE_SENSOR_ID": "7"}, "sensor 7", "environment (ATTUNE_API_TOKEN)")]
        for name, env, issuer, source in cases:
            for argv in (("auth", "whoami"), ("pack", "list"), ("auth", "token"), ("auth", "refresh")):
                with self.subTest(case=name, argv=argv):
                    result = self.fails(4, *argv, env=env)
                    self.assertIn("the access token Attune issued for %s (%s" % (issuer, source), result.err)
                    self.assertIn("Attune issues these tokens itself and attune.py never renews one", result.err)
                    for wrong in ("auth login", "ATTUNE_REFRESH_TOKEN", "expired; run"):
                        self.assertNotIn(wrong, result.err)
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)
        self.assertEqual(self.read_doc(), before)
        # the expiry the platform hands over counts for ATTUNE_API_TOKEN, and the legacy name too
        valid = self.server.mint("admin", "sensor")
        for name in ("ATTUNE_API_TOKEN_EXPIRES_AT", "ATTUNE_SENSOR_TOKEN_EXPIRES_AT"):
            with self.subTest(variable=name):
                env = {"ATTUNE_API_URL": self.server.url, "ATTUNE_API_TOKEN": valid, "ATTUNE_SENSOR_REF": "s",
                       name: "2001-01-01T00:00:00Z"}
                self.assertIn("never renews one", self.fails(4, "auth", "token", env=env).err)
                env[name] = str(now + 7200)
                self.assertEqual(self.ok("auth", "token", "--format", "json", env=env, secrets_ok=True).json()[
                    "expires_at"], now + 7200)
        # with ATTUNE_REFRESH_TOKEN the user chose to refresh: that is not the platform's token
        self.ok("auth", "whoami", env={"ATTUNE_API_URL": self.server.url, "ATTUNE_API_TOKEN": expired,
                                       "ATTUNE_EXEC_ID": "42", "ATTUNE_REFRESH_TOKEN": refresh})
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 1)

    def test_a_rejected_token_reads_the_state_file_again_before_it_gives_up(self):
        old, new = (self.server.mint("admin", "sensor", ttl=ttl) for ttl in (3600, 3601))  # two tokens
        path = self.state(old)
        self.server.revoked.add(old)
        self.assertIn("never renews one", self.fails(4, "auth", "whoami", env=self.sensor_env(path)).err)
        rejected = len(self.server.requests)
        self.assertEqual(rejected, 1)  # nothing new in the file: no second request, no refresh
        def rotated_after_the_first_request(path):
            return (new if self.server.requests[rejected:] else old), None

        with mock.patch.object(attune, "read_token_state", side_effect=rotated_after_the_first_request):
            self.ok("auth", "whoami", env=self.sensor_env(path))  # rotated between the read and the 401
        self.assertEqual([r.token for r in self.server.requests[rejected:]], [old, new])
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    def test_a_sensor_process_follows_rotations_of_the_state_file(self):
        """A long-running child (a sensor's Python code using import attune): each rewrite of
        the file is used by the next request, with no refresh request ever."""
        tokens = [self.server.mint("admin", "sensor", ttl=3600 + n) for n in range(4)]  # four different ones
        path = self.state(tokens[0], "2099-01-01T00:00:00Z")
        directory = os.path.join(self.tmp, "sensor")
        os.makedirs(directory)
        shutil.copy(ATTUNE_PY, os.path.join(directory, "attune.py"))
        with open(os.path.join(directory, "sensor.py"), "w") as f:
            f.write(SENSOR_SCRIPT)
        env = self.process_env(self.sensor_env(path))
        env.pop("PYTHONPATH", None)
        child = subprocess.Popen([sys.executable, os.path.join(directory, "sensor.py")], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
        self.addCleanup(child.wait, 60)
        self.addCleanup(child.kill)
        seen = []
        for n, token in enumerate(tokens):
            if n:
                self.state(token, "2099-01-01T00:00:00Z")  # the runtime rotates it
                self.server.revoked.add(tokens[n - 1])  # and the old one stops working
            child.stdin.write("go\n")
            child.stdin.flush()
            self.assertEqual(child.stdout.readline(), "admin state_file\n")  # waits for the answer (an event)
            seen.append(self.server.requests[-1].token)
        child.stdin.close()
        self.assertEqual(child.wait(60), 0)
        self.assertEqual(child.stderr.read(), "")
        child.stdout.close()
        child.stderr.close()
        self.assertEqual(seen, tokens)
        self.assertEqual(self.server.count("GET", "/auth/me"), 4)  # read before each request: never a 401 first
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)


RUST_CONFIG = """profile: staging
profiles:
  staging:
    api_url: %(url)s
    auth_token: %(access)s
    refresh_token: %(refresh)s
    description: Staging
    auth_method: direct
    username: admin
  default:
    api_url: http://localhost:8080
    description: Default local server
format: json
"""
RUST_CONFIG_LEGACY = """current_profile: lab
default_output_format: yaml
profiles:
  lab:
    api_url: '%(url)s'
    auth_token: "%(access)s"
    output_format: table
"""


class ConfigImportTests(AttuneTestCase):
    """config import: the Rust CLI's config.yaml, in the shapes it writes, through the locked
    write; tokens never printed."""

    def rust_config(self, template=RUST_CONFIG, mode=0o644, path=None):
        access, refresh = self.server.mint("admin"), self.server.mint("admin", "refresh")
        self.extra_secrets = {access, refresh}
        path = path or os.path.join(self.tmp, "home", ".config", "attune", "config.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(template % {"url": self.server.url, "access": access, "refresh": refresh})
        os.chmod(path, mode)
        return path, access, refresh

    def test_import_from_where_the_rust_cli_keeps_it_and_use_the_session(self):
        path, access, refresh = self.rust_config()
        result = self.ok("config", "import")
        self.assertIn("%s holds tokens and is readable by others (mode 644; the Rust CLI writes it so); run: "
                      "chmod 600 %s" % (attune.quoted(path), path), result.err)
        self.assertEqual([line.split()[0] for line in result.out.splitlines()[2:]], ["default", "staging"])
        self.assertIn("yes      added", result.out)
        doc = self.read_doc()
        self.assertEqual(doc["current_profile"], "staging")
        self.assertEqual(doc["profiles"]["staging"], {"api_url": self.server.url, "auth_token": access,
                                                      "refresh_token": refresh, "description": "Staging",
                                                      "auth_method": "direct", "username": "admin"})
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
        self.ok("pack", "list")
        self.assertEqual(self.server.requests[-1].token, access)
        # XDG_CONFIG_HOME moves it, as for the Rust CLI
        elsewhere = os.path.join(self.tmp, "xdg")
        self.rust_config(RUST_CONFIG_LEGACY, 0o600, os.path.join(elsewhere, "attune", "config.yaml"))
        result = self.ok("config", "import", "-j", env={"XDG_CONFIG_HOME": elsewhere})
        self.assertEqual(result.err, "")  # 0600: no warning
        self.assertEqual(result.json()["profiles"], [{"profile": "lab", "api_url": self.server.url, "tokens": True,
                                                      "result": "added"}])
        self.assertEqual(self.read_doc()["current_profile"], "staging")  # ours is kept

    def test_existing_profiles_are_kept_unless_overwrite(self):
        self.seed("staging")
        ours = self.profile("staging")
        path, access, _ = self.rust_config()
        rows = self.ok("config", "import", path, "-j").json()["profiles"]
        self.assertEqual([(r["profile"], r["result"]) for r in rows],
                         [("default", "added"), ("staging", "kept (exists; --overwrite replaces it)")])
        self.assertEqual(self.profile("staging"), ours)
        rows = self.ok("config", "import", path, "--overwrite", "-j").json()["profiles"]
        self.assertEqual([r["result"] for r in rows], ["replaced", "replaced"])
        self.assertEqual(self.profile("staging")["auth_token"], access)

    def test_dry_run_creates_nothing(self):
        path, _, _ = self.rust_config(mode=0o600)
        result = self.ok("config", "import", path, "--dry-run", "-j").json()
        self.assertEqual([r["result"] for r in result["profiles"]], ["would add", "would add"])
        self.assertTrue(result["dry_run"])
        self.assertFalse(os.path.exists(self.config))

    def test_what_cannot_be_imported_writes_nothing(self):
        self.seed()
        before = self.read_doc()
        bad = os.path.join(self.tmp, "bad.yaml")
        cases = [("profile: x\nprofiles:\n  x:\n    description: no url\n", "has no api_url"),
                 ("profiles:\n  x:\n    api_url: ftp://nope\n", "it must start with http:// or https://"),
                 ("profiles:\n  x:\n    api_url: http://h\n    auth_token: 'two words'\n", "is malformed"),
                 ("profiles: [a, b]\n", "no profiles: mapping"),
                 ("profiles:\n  x: [\n", "is not readable YAML"),
                 ("\xff", "is not readable YAML")]
        for text, message in cases:
            with self.subTest(text=text):
                with open(bad, "w", encoding="latin-1") as f:
                    f.write(text)
                self.assertIn(message, self.fails(3, "config", "import", bad).err)
        with open(bad, "w") as f:
            f.write("profiles:\n  'bad name\u202e':\n    api_url: http://h\n")
        self.assertNotEqual(self.run_cli("config", "import", bad).code, 0)
        self.assertIn("cannot read", self.fails(3, "config", "import", os.path.join(self.tmp, "none.yaml")).err)
        self.assertEqual(self.read_doc(), before)


def readme_script(marker):
    """The README's sh block whose first lines hold marker, as written."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```sh\n(.*?)^```$", f.read(), re.M | re.S)
    found = [b for b in blocks if marker in b.split("\n", 3)[1]]
    assert len(found) == 1, marker
    return found[0]


class BootstrapScriptTests(AttuneTestCase):
    """The README's bootstrap.sh against a fresh server (an admin with its initial password),
    run twice as written: every step done once, nothing changed the second time, no secret in
    any argv or output."""
    INITIAL, NEW = "initial-Admin-pw1", "the-n3w-Admin-pw"
    server_options = {"admin_password": INITIAL}

    def setUp(self):
        super().setUp()
        self.secrets_dir = os.path.join(self.tmp, "secrets")
        os.makedirs(self.secrets_dir, mode=0o700)
        for name, value in (("admin-initial", self.INITIAL), ("admin-password", self.NEW)):
            with open(os.path.join(self.secrets_dir, name), "w") as f:
                f.write(value + "\n")
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir)
        self.argv_log = os.path.join(self.tmp, "argv.log")
        shim = os.path.join(bin_dir, "attune")
        with open(shim, "w") as f:  # the attune the script calls: records its arguments, runs attune.py
            f.write('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\nexec %s %s "$@"\n'
                    % (shlex.quote(self.argv_log), shlex.quote(sys.executable), shlex.quote(ATTUNE_PY)))
        os.chmod(shim, 0o755)
        self.script = os.path.join(self.tmp, "bootstrap.sh")
        with open(self.script, "w") as f:
            f.write(readme_script("bootstrap.sh"))
        self.path = bin_dir + os.pathsep + "/usr/bin:/bin"

    def bootstrap(self):
        env = self.process_env({"PATH": self.path, "ATTUNE_API_URL": self.server.url, "SECRETS": self.secrets_dir})
        p = subprocess.run(["sh", self.script], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        return Result(p.returncode, p.stdout, p.stderr)

    def state(self):
        server = self.server
        return (list(server.password_changes), json.dumps(server.identities, sort_keys=True),
                sorted((r["identity_id"], r["label"], r["active"]) for r in server.itoken_records.values()))

    def test_from_a_fresh_server_to_a_token_for_ci_twice(self):
        first = self.bootstrap()
        self.assertEqual(first.code, 0, first)
        after_first = self.state()
        changes, _, tokens = after_first
        self.assertEqual(changes, ["admin"])
        bot = next(i for i in self.server.identities.values() if i["login"] == "ci-bot")
        self.assertEqual(bot["display_name"], "CI pipeline")
        self.assertEqual([p["permission_set_ref"] for p in bot["direct_permissions"]], ["ops.operator"])
        self.assertEqual(tokens, [(bot["id"], "ci", True)])
        token_file = os.path.join(self.secrets_dir, "ci-token")
        self.assertEqual(stat.S_IMODE(os.stat(token_file).st_mode), 0o600)
        with open(token_file) as f:
            ci_token = f.read().strip()
        self.assertEqual(self.server.integration_tokens[ci_token], "ci-bot")  # CI can use it
        self.extra_secrets = {ci_token, self.INITIAL, self.NEW}
        second = self.bootstrap()
        self.assertEqual(second.code, 0, second)
        self.assertEqual(self.state(), after_first)  # nothing changed
        with open(token_file) as f:
            self.assertEqual(f.read().strip(), ci_token)
        for result in (first, second):
            self.assert_no_leak(result)
        with open(self.argv_log) as f:
            argv = f.read()
        self.assertEqual(argv.count("\n"), 11)  # 6 commands the first time, 5 the second (logged in)
        for secret in self.server.secrets() | self.extra_secrets:
            self.assertNotIn(secret, argv, "a secret was on a command line")
        # and the admin now logs in with the new password only
        self.ok("auth", "login", "--url", self.server.url, "-u", "admin", "--password-stdin", stdin=self.NEW + "\n")
        self.fails(4, "auth", "login", "--url", self.server.url, "-u", "admin", "--password-stdin",
                   stdin=self.INITIAL + "\n")


class WorkerCommandTests(ResourceTestCase):
    """worker list/show/cordon/uncordon/history and execution history: the exact requests,
    and the liveness the server works out, shown as it is."""

    def test_list_and_show(self):
        lines = self.lines("worker", "list")
        self.assertEqual(lines[0].split(), ["ID", "Name", "Role", "Health", "Heartbeat", "Load", "Cordoned"])
        self.assertRegex(lines[2], r"^1\s+worker-build-01\s+action\s+busy\s+12s ago\s+3/10 \(30%\)\s+✗$")
        self.assertRegex(lines[3], r"^2\s+sensor-01\s+sensor\s+offline\s+6m 40s ago \(stale\)\s+0\s+✗$")
        self.assertEqual(self.targets(), ["GET /api/v1/workers?page=1&page_size=50"])
        listed = self.ok("worker", "list", "--health", "offline", "--cordoned", "false", "-q", "sensor", "-j").json()
        self.assertEqual([w["id"] for w in listed], [2])
        self.assertEqual(self.targets()[-1],
                         "GET /api/v1/workers?q=sensor&health_state=offline&cordoned=false&page=1&page_size=50")
        self.fails(2, "worker", "list", "--health", "sleepy")
        shown = self.ok("worker", "show", "1").out
        self.assertIn("Worker: worker-build-01", shown)
        self.assertRegex(shown, r"Health:\s+busy\n")
        self.assertRegex(shown, r"Runtimes:\s+python 3.11.9\n")
        self.assertEqual(self.ok("worker", "show", "2", "-j").json()["heartbeat_stale"], True)
        self.assertIn("Worker with ID 9 not found", self.fails(1, "worker", "show", "9").err)

    def test_cordon_needs_yes_and_always_sends_a_json_body(self):
        self.assertIn("add --yes", self.fails(2, "worker", "cordon", "1").err)
        self.assertEqual(self.server.count("POST", "/api/v1/workers/1/cordon"), 0)
        done = self.ok("worker", "cordon", "1", "--yes")
        self.assertIn("Worker 1 cordoned", done.out)
        self.assertEqual(self.sent("POST", "/api/v1/workers/1/cordon").json(), {})  # never bodiless (415)
        self.assertEqual(self.server.workers[1]["health_state"], "cordoned")
        self.server.requests.clear()
        self.ok("worker", "cordon", "1", "--reason", "kernel update", "--yes", "-j")
        self.assertEqual(self.sent("POST", "/api/v1/workers/1/cordon").json(), {"reason": "kernel update"})
        self.assertEqual(self.server.workers[1]["cordon_reason"], "kernel update")
        self.assertIn("Worker 1 uncordoned", self.ok("worker", "uncordon", "1").out)
        self.assertFalse(self.server.workers[1]["cordoned"])

    def test_history_of_a_worker_and_of_an_execution(self):
        lines = self.lines("worker", "history", "1")
        self.assertEqual(lines[0].split(), ["Time", "Operation", "Changed", "Before", "After"])
        self.assertIn('UPDATE     status   {"status":"inactive"}  {"status":"active"}', lines[2])
        self.assertEqual(self.targets(), ["GET /api/v1/workers/1/history?page=1&page_size=50"])
        self.server.history[("execution", 812)] = [
            {"time": SEED_STAMP, "operation": "UPDATE", "entity_id": 812, "entity_ref": "core.echo",
             "changed_fields": ["status"], "old_values": {"status": "running"}, "new_values": {"status": "failed"}},
            {"time": SEED_STAMP, "operation": "INSERT", "entity_id": 812, "entity_ref": "core.echo",
             "changed_fields": [], "old_values": None, "new_values": None}]
        records = self.ok("execution", "history", "812", "--field", "status", "-j").json()
        self.assertEqual([r["operation"] for r in records], ["UPDATE"])
        self.assertEqual(self.targets()[-1], "GET /api/v1/executions/812/history?page=1&page_size=50&changed_field=status")
        self.assertEqual(len(self.ok("execution", "history", "812", "--all", "-j").json()), 2)
        self.assertIn("No history records found", self.ok("worker", "history", "2").out)
        self.fails(2, "worker", "history", "1", "--per-page", "1001")


class OnCallFormatTests(ResourceTestCase):
    """Every read command of the on-call groups in each output format: YAML says what JSON
    says, --fields keeps the field named, ndjson is refused (cache entry scan alone has it)."""
    COMMANDS = [("worker", "list"), ("worker", "show", "1"), ("worker", "history", "1"), ("event", "list"),
                ("event", "show", "501"), ("enforcement", "list"), ("enforcement", "show", "601"),
                ("execution", "stats"), ("execution", "history", "812")]

    def test_each_format(self):
        self.server.history[("execution", 812)] = [
            {"time": SEED_STAMP, "operation": "INSERT", "entity_id": 812, "entity_ref": "core.echo",
             "changed_fields": [], "old_values": None, "new_values": None}]
        for argv in self.COMMANDS:
            with self.subTest(argv=argv):
                data = self.ok(*argv, "-j").json()
                self.assertEqual(attune.yaml_loads(self.ok(*argv, "-o", "yaml").out), data)
                first = data[0] if isinstance(data, list) else data
                field = sorted(first)[0]
                picked = self.ok(*argv, "-j", "--fields", field).json()
                if isinstance(data, list):
                    self.assertEqual(picked, [{field: item[field]} for item in data])
                else:
                    self.assertEqual(picked, {field: data[field]})
                self.fails(2, *argv, "-o", "ndjson")
                self.assertTrue(self.ok(*argv).out)  # a table


class WebhookKeyTests(ResourceTestCase):
    """trigger webhook enable|disable|regenerate: a new key on the stdout of that command only;
    trigger show masks it in every output form (the suite's secret scan checks the rest)."""

    def test_enable_regenerate_disable_and_the_key_shown_once(self):
        enabled = self.ok("trigger", "webhook", "enable", "core.timer", secrets_ok=True)
        key = self.server.triggers["core.timer"]["webhook_key"]
        self.assertIn(key, enabled.out)
        self.assertIn("/api/v1/webhooks/%s" % key, enabled.out)
        self.assertIn("Copy the key now", enabled.err)
        self.assertEqual(self.sent("POST", "/api/v1/triggers/core.timer/webhooks/enable").json(), {})
        for form in ((), ("-j",)):  # enabled already: the server answers with the same key, masked here
            with self.subTest(again=form):
                again = self.ok("trigger", "webhook", "enable", "core.timer", *form)  # scanned: no key
                self.assertEqual(self.server.triggers["core.timer"]["webhook_key"], key)
                if form:
                    self.assertEqual(again.json()["webhook_key"], "***")
                else:
                    self.assertIn("was enabled already; its key is unchanged", again.out)
                    self.assertNotIn("Copy the key now", again.err)
        for form in ((), ("-j",), ("-y",)):
            with self.subTest(form=form):
                shown = self.ok("trigger", "show", "core.timer", *form)  # scanned: the key in no output
                self.assertIn("***", shown.out)
        self.assertEqual(self.ok("trigger", "show", "core.timer", "-j").json()["webhook_key"], "***")
        regenerated = self.ok("trigger", "webhook", "regenerate", "core.timer", "-j", secrets_ok=True).json()
        self.assertNotEqual(regenerated["webhook_key"], key)
        self.assertEqual(regenerated["webhook_key"], self.server.triggers["core.timer"]["webhook_key"])
        self.assertIn("Webhook of trigger 'core.timer' disabled",
                      self.ok("trigger", "webhook", "disable", "core.timer").out)
        self.assertIn("Webhooks are not enabled for this trigger",
                      self.fails(1, "trigger", "webhook", "regenerate", "core.timer").err)
        self.assertIn("trigger webhook", self.fails(2, "trigger", "webhook").err)


class EventChainTests(ResourceTestCase):
    """Why did my rule (not) fire: event -> enforcements -> executions, each show naming the
    ids the next command takes; the lists page with per_page, as the server's do."""

    def test_from_an_event_to_the_execution_it_started(self):
        lines = self.lines("event", "list", "--trigger", "core.webhook")
        self.assertEqual(lines[0].split(), ["ID", "Trigger", "Source", "Rule", "Payload", "Created"])
        self.assertTrue(lines[2].startswith("501  core.webhook  core.webhook_sensor  -     ✓"), lines)
        self.assertEqual(self.targets(), ["GET /api/v1/events?trigger_ref=core.webhook&page=1&per_page=50"])
        shown = self.ok("event", "show", "501").out
        self.assertIn('"disk": "full"', shown)
        self.assertRegex(shown, r"Enforcements\n─+\nID +Rule +Trigger +Event +Status +Condition +Created\n.*\n"
                                r"601 +examples.on_hook +core.webhook +501 +processed +all ")
        self.assertEqual(self.targets()[-2:], ["GET /api/v1/events/501",
                                               "GET /api/v1/enforcements?event=501&per_page=100"])
        self.assertIn("No enforcements: no rule matched this event", self.ok("event", "show", "502").out)
        eid = self.execute("core.echo", "message=disk")
        self.server.executions[eid]["enforcement"] = 601
        doc = self.ok("enforcement", "show", "601", "-j").json()
        self.assertEqual([x["id"] for x in doc["executions"]], [eid])
        self.assertEqual(self.targets()[-1], "GET /api/v1/executions?enforcement=601&per_page=100")
        shown = self.ok("enforcement", "show", "601").out
        self.assertRegex(shown, r"\n%d +core.echo +" % eid)
        self.assertRegex(shown, r"Condition: +all\nCreated: +\S+ \S+\nResolved: +\S+ \S+\n\nConditions\n─+\n\[\]\n")
        self.ok("execution", "show", str(eid))  # the id the chain ends with
        listed = self.ok("enforcement", "list", "--rule", "examples.on_hook", "--status", "processed", "-j").json()
        self.assertEqual([e["id"] for e in listed], [601])
        self.assertEqual(self.ok("enforcement", "list", "--event", "502", "-j").json(), [])
        self.fails(2, "enforcement", "list", "--status", "lost")
        self.assertIn("Event with ID 9 not found", self.fails(1, "event", "show", "9").err)


class RescheduleTests(ResourceTestCase):
    def test_stats_in_each_format(self):
        for status in ("requested", "scheduled", "running", "failed", "failed", "canceling"):
            self.server.executions[self.execute("core.echo", "message=x")]["status"] = status
        self.server.requests.clear()
        table = self.ok("execution", "stats").out
        for label, count in (("Total", 6), ("Pending", 2), ("Running", 1), ("Completed", 0), ("Failed", 2),
                             ("Cancelled", 1), ("Timed out", 0), ("Abandoned", 0)):
            self.assertRegex(table, r"\n%s:\s+%d\n" % (label, count))
        data = self.ok("execution", "stats", "-j").json()
        self.assertEqual((data["total"], data["pending"], data["cancelled"]), (6, 2, 1))
        self.assertIn("pending: 2\n", self.ok("execution", "stats", "-o", "yaml").out)
        self.assertRegex(self.ok("execution", "stats", "--fields", "failed").out, r"^failed:\s+2\n$")
        self.assertEqual(set(self.targets()), {"GET /api/v1/executions/stats"})

    def test_only_a_requested_execution_and_never_sent_twice(self):
        eid = self.execute("core.echo", "message=x")
        self.server.executions[eid]["status"] = "requested"
        self.assertIn("add --yes", self.fails(2, "execution", "reschedule", str(eid)).err)
        done = self.ok("execution", "reschedule", str(eid), "--yes")
        self.assertIn("Execution %d handed to the scheduler again" % eid, done.out)
        self.assertRegex(done.out, r"Attempt:\s+1\n")
        self.assertEqual(self.ok("execution", "reschedule", str(eid), "--yes", "-j").json()["attempt_count"], 2)
        self.server.executions[eid]["status"] = "running"
        message = self.fails(1, "execution", "reschedule", str(eid), "--yes").err
        self.assertIn("execution %d was not rescheduled: Execution %d is in status 'running'" % (eid, eid), message)
        self.assertIn("see: attune execution show %d" % eid, message)
        self.server.executions[eid]["status"] = "requested"
        self.server.requests.clear()
        self.server.fail("/api/v1/executions/%d/reschedule" % eid, status=502, times=None)
        self.fails(6, "execution", "reschedule", str(eid), "--yes")
        self.assertEqual(self.server.count("POST", "/api/v1/executions/%d/reschedule" % eid), 1)  # a POST: once


class SensorLogTests(ResourceTestCase):
    """sensor logs: the whole log or its tail; --follow looks again and prints only what is
    new, through a revoked token (the session refreshes) and a dropped answer."""
    PATH = "/api/v1/sensors/core.timer_sensor/logs/stdout"

    def test_whole_log_and_tail(self):
        self.assertEqual(self.ok("sensor", "logs", "core.timer_sensor").out, "".join("tick %d\n" % n for n in range(1, 6)))
        self.assertEqual(self.ok("sensor", "logs", "core.timer_sensor", "--tail", "2").out, "tick 4\ntick 5\n")
        self.assertEqual(self.targets(), ["GET %s" % self.PATH, "GET %s?tail=2" % self.PATH])
        self.assertIn("Sensor log not found",
                      self.fails(1, "sensor", "logs", "core.timer_sensor", "--stream", "stderr").err)
        self.fails(2, "sensor", "logs", "core.timer_sensor", "--stream", "stdin")
        self.fails(2, "sensor", "logs", "core.timer_sensor", "--tail", "0")

    def test_follow_gives_up_after_five_failed_looks_in_a_row(self):
        looks = []

        def between_looks(seconds):
            if seconds == attune.SENSOR_LOG_POLL:
                looks.append(seconds)
                self.assertLess(len(looks), 20, "the follow never gave up")
        self.server.fail(self.PATH, status=503, times=None)
        with mock.patch.object(attune.time, "sleep", side_effect=between_looks):
            result = self.run_cli("sensor", "logs", "core.timer_sensor", "--follow")
        self.assertEqual(result.code, 6, result)  # the server error of the sixth look
        self.assertEqual(len(looks), attune.SENSOR_LOG_FAILURES)
        self.assertEqual(result.out, "")

    def test_new_lines_are_found_after_the_overlap(self):
        self.assertEqual(attune.new_lines(["a", "b", "c"], ["b", "c", "d", "e"]), ["d", "e"])
        self.assertEqual(attune.new_lines(["a", "b", "c"], ["a", "b", "c"]), [])
        self.assertIsNone(attune.new_lines(["a", "b"], ["x", "y"]))
        self.assertEqual(attune.new_lines(["x", "a", "x"], ["x", "b"]), ["b"])

    def test_follow_prints_only_what_is_new_across_a_refresh_and_a_drop(self):
        server, looks = self.server, []

        def between_looks(seconds):  # instead of waiting: the sensor writes, tokens come and go
            if seconds != attune.SENSOR_LOG_POLL:
                return  # the transport's own short waits before it tries a GET again
            looks.append(seconds)
            key = ("core.timer_sensor", "stdout")
            if len(looks) == 1:
                server.sensor_logs[key] += "tick 6\ntick 7\n"
                server.revoked.add(self.profile()["auth_token"])  # the next look refreshes first
            elif len(looks) == 2:
                server.fail(self.PATH, drop=True, times=3)  # the next look finds no answer, retries included
                server.sensor_logs[key] += "tick 8\n"
            elif len(looks) == 4:
                server.sensor_logs[key] = "".join("burst %d\n" % n for n in range(20))  # rotated, then busy
            elif len(looks) == 5:
                raise KeyboardInterrupt
        with mock.patch.object(attune.time, "sleep", side_effect=between_looks):
            result = self.run_cli("sensor", "logs", "core.timer_sensor", "--follow", "--tail", "3")
        self.assertEqual(result.code, 130, result)
        self.assertEqual(result.out, "tick 3\ntick 4\ntick 5\ntick 6\ntick 7\ntick 8\nburst 17\nburst 18\nburst 19\n")
        self.assertIn("more than 3 lines came between two looks", result.err)
        self.assertEqual(looks, [2] * 5)  # one look failed and the follow went on
        self.assertEqual(server.count("POST", "/auth/refresh"), 1)
        self.assertTrue(all(r.query.get("tail") == ["3"] for r in server.requests if r.path == self.PATH))


class IdentityLifecycleTests(ResourceTestCase):
    """identity create / update / delete: the server's rules first, --if-missing on its 409,
    masked attributes never written back."""

    def test_create_with_a_password_from_stdin_and_attributes(self):
        secret = "svc-passw0rd-1"
        self.extra_secrets = {secret}
        result = self.ok("identity", "create", "ci-bot", "--display-name", "CI", "--password-stdin",
                         "--attribute", "team=ops", "--attribute", "api_key=abc", "-j", stdin=secret + "\n")
        created = result.json()
        self.assertEqual((created["login"], created["display_name"], created["attributes"]),
                         ("ci-bot", "CI", {"team": "ops", "api_key": "***"}))
        self.assertEqual(self.sent("POST", "/api/v1/identities").json(),
                         {"login": "ci-bot", "display_name": "CI", "password": secret,
                          "attributes": {"team": "ops", "api_key": "abc"}})
        self.assertEqual(self.server.users["ci-bot"]["password"], secret)
        table = self.ok("identity", "show", "ci-bot").out
        self.assertIn('Attributes\n──────────\nteam: ops\napi_key: "***"', table)

    def test_if_missing_shows_the_existing_identity(self):
        self.fails(1, "identity", "create", "zoe")  # 409 without --if-missing
        result = self.ok("identity", "create", "zoe", "--if-missing")
        self.assertIn("Identity 'zoe' exists already (id 3); nothing changed", result.out)
        self.assertIn("Login:         zoe", result.out)
        self.assertEqual(self.ok("identity", "create", "zoe", "--if-missing", "-j").json()["id"], 3)
        first = self.ok("identity", "create", "svc", "--if-missing", "-j").json()
        self.assertEqual(self.ok("identity", "create", "svc", "--if-missing", "-j").json()["id"], first["id"])

    def test_the_server_rules_are_checked_first(self):
        for argv, stdin, message in (
                (["ab"], "", "a login must be 3 to 255 characters long"),
                (["x" * 256], "", "a login must be 3 to 255 characters long"),
                (["okay", "--password-stdin"], "short\n", "the password must be 8 to 128 characters long"),
                (["okay", "--password-stdin"], "", "no password on standard input"),
                (["okay", "--attribute", "novalue"], "", "Expected key=value")):
            with self.subTest(argv=argv[:2]):
                self.assertIn(message, self.fails(2, "identity", "create", *argv, stdin=stdin).err)
        self.assertEqual(self.server.requests, [])

    def test_update_adds_attributes_and_never_writes_a_masked_one_back(self):
        self.server.identities[3]["attributes"] = {"team": "ops", "api_token": "real-secret-value"}
        dry = self.ok("identity", "update", "zoe", "--display-name", "Zoë", "--dry-run", "-j").json()
        self.assertEqual((dry["before"], dry["after"], dry["changed"]),
                         ({"display_name": "Zoë Ørsted"}, {"display_name": "Zoë"}, False))
        self.assertEqual([r.method for r in self.server.requests if r.method != "GET"], [])
        message = self.fails(2, "identity", "update", "zoe", "--attribute", "team=dev").err
        self.assertIn("the server shows attribute(s) 'api_token' only as ***", message)
        self.ok("identity", "update", "zoe", "--attribute", "team=dev", "--attribute", "api_token=new-secret-value",
                "--replace-attributes")
        self.assertEqual(self.server.identities[3]["attributes"], {"team": "dev", "api_token": "new-secret-value"})
        self.ok("identity", "update", "--identity-id", "3", "--display-name", "Zoë")
        self.assertEqual(self.server.identities[3]["display_name"], "Zoë")
        again = self.ok("identity", "update", "zoe", "--display-name", "Zoë", "-j").json()
        self.assertEqual((again["changed"], again["would_change"]), (False, False))
        self.assertEqual(self.server.count("PUT", "/api/v1/identities/3"), 2)
        self.assertIn("At least one field must be provided to update", self.fails(2, "identity", "update", "zoe").err)

    def test_update_a_password(self):
        secret = "zoe-new-passw0rd"
        self.extra_secrets = {secret}
        result = self.ok("identity", "update", "zoe", "--password-stdin", "-j", stdin=secret + "\n").json()
        self.assertEqual((result["before"], result["after"]), ({"password": "(unchanged)"}, {"password": "(new)"}))
        self.assertEqual(self.server.users["zoe"]["password"], secret)

    def test_delete_needs_yes_and_never_deletes_yourself(self):
        self.assertIn("add --yes", self.fails(2, "identity", "delete", "zoe").err)
        self.assertIn(3, self.server.identities)
        self.assertIn("Identity 'zoe' deleted", self.ok("identity", "delete", "zoe", "--yes").out)
        self.assertNotIn(3, self.server.identities)
        self.assertIn("Identity 'zoe' not found", self.fails(1, "identity", "delete", "zoe", "--yes").err)
        self.assertIn("Refusing to delete the currently authenticated identity",
                      self.fails(1, "identity", "delete", "admin", "--yes").err)


class IdentityCommandTests(ResourceTestCase):
    def test_list_and_show(self):
        self.assertEqual(self.lines("identity", "list"), [
            "ID  Login  Display name   Frozen  Roles", "──  ─────  ─────────────  ──────  ─────────",
            "1   admin  Administrator  false   admin", "3   zoe    Zoë Ørsted     false   operators"])
        self.assertEqual(self.targets(), ["GET /api/v1/identities?page=1&page_size=50"])
        page = self.ok("identity", "list", "--login", "zoe", "--per-page", "100", "-j").json()
        self.assertEqual([i["login"] for i in page["items"]], ["zoe"])
        self.assertIn("pagination", page)
        self.assertEqual(self.targets()[-1], "GET /api/v1/identities?login=zoe&page=1&page_size=100")
        self.fails(2, "identity", "list", "--per-page", "101")
        out = self.ok("identity", "show", "admin").out
        self.assertEqual(self.targets()[-2:], ["GET /api/v1/identities?login=admin&page=1&page_size=100",
                                               "GET /api/v1/identities/1"])
        self.assertIn("Display name:  Administrator\nFrozen:        false\n\nRoles\n─────\n", out)
        self.assertIn("11  admin  local   ✗", out)
        self.assertIn("- id: 21\n  identity_id: 1\n  permission_set_id: 5\n  permission_set_ref: core.admin", out)
        shown = self.ok("identity", "show", "--identity-id", "3", "-j").json()
        self.assertEqual(sorted(shown), ["attributes", "direct_permissions", "display_name", "frozen", "id", "login",
                                         "roles"])
        self.assertIn("Identity 'nobody' not found", self.fails(1, "identity", "show", "nobody").err)
        self.assertIn("name the identity by LOGIN or --identity-id N", self.fails(2, "identity", "show").err)
        self.fails(2, "identity", "show", "zoe", "--identity-id", "3")

    def test_a_login_is_found_on_any_page_because_the_server_does_not_filter(self):
        for n in range(150):
            self.server.identities[1000 + n] = {"id": 1000 + n, "login": "user%03d" % n, "display_name": None,
                                                "frozen": False, "attributes": {}, "roles": [], "direct_permissions": []}
        self.assertEqual(self.ok("identity", "show", "user149", "-j").json()["id"], 1149)
        self.assertEqual([t for t in self.targets() if "?" in t], [
            "GET /api/v1/identities?login=user149&page=1&page_size=100",
            "GET /api/v1/identities?login=user149&page=2&page_size=100"])
        listed = self.ok("identity", "list", "--login", "user000", "-j").json()
        self.assertEqual([i["login"] for i in listed["items"]], ["user000"])
        self.assertIn("Identity 'user1' not found", self.fails(1, "identity", "show", "user1").err)  # exact only

    def test_roles(self):
        self.assertEqual(self.ok("identity", "role", "list", "zoe", "-j").json()[0]["role"], "operators")
        dry = self.ok("identity", "role", "add", "zoe", "auditors", "--dry-run", "-j").json()
        self.assertEqual(dry, {"operation": "role_add", "target": {"identity_id": 3, "login": "zoe", "role": "auditors"},
                               "dry_run": True, "changed": False, "would_change": True,
                               "before": ["operators"], "after": ["auditors", "operators"]})
        self.assertEqual([r.method for r in self.server.requests if r.method != "GET"], [])
        done = json.loads(self.ok("identity", "role", "add", "zoe", "auditors").out)
        self.assertTrue(done["changed"])
        self.assertEqual(self.server.requests[-1].json(), {"role": "auditors"})
        again = self.ok("identity", "role", "add", "zoe", "auditors", "-j").json()
        self.assertEqual((again["changed"], again["would_change"]), (False, False))
        self.assertEqual(self.server.count("POST", "/api/v1/identities/3/roles"), 1)
        removed = self.ok("identity", "role", "remove", "--identity-id", "3", "auditors", "-j").json()
        self.assertEqual((removed["changed"], removed["after"]), (True, ["operators"]))
        self.assertIn("Role 'operators' is provider-managed",
                      self.fails(1, "identity", "role", "remove", "zoe", "operators").err)
        self.assertIn("Role name must contain 1 to 255 characters",
                      self.fails(2, "identity", "role", "add", "zoe", "  ").err)

    def test_freeze_and_unfreeze(self):
        frozen = self.ok("identity", "freeze", "zoe", "-j").json()
        self.assertEqual((frozen["operation"], frozen["before"], frozen["after"], frozen["changed"]),
                         ("freeze", {"frozen": False}, {"frozen": True}, True))
        self.assertTrue(self.server.identities[3]["frozen"])
        self.assertEqual(self.sent("POST", "/api/v1/identities/3/freeze").json(), {})
        self.assertFalse(self.ok("identity", "freeze", "zoe", "-j").json()["changed"])
        self.assertEqual(self.server.count("POST", "/api/v1/identities/3/freeze"), 1)
        self.ok("identity", "unfreeze", "zoe", "--dry-run")
        self.assertTrue(self.server.identities[3]["frozen"])
        self.ok("identity", "unfreeze", "zoe")
        self.assertFalse(self.server.identities[3]["frozen"])


class PermissionCommandTests(ResourceTestCase):
    def test_set_list_show_and_export(self):
        self.assertEqual(self.lines("permission", "set", "list"), [
            "ID  Ref           Pack  Origin    Status  Roles", "──  ────────────  ────  ────────  ──────  ──────",
            "5   core.admin    core  pack      active  admins", "6   ops.operator        manual    active",
            "7   system.root         platform  active"])
        self.assertEqual(self.targets(), ["GET /api/v1/permissions/sets?include_retired=false"])
        listed = self.ok("permission", "set", "list", "--pack", "old", "--include-retired", "-j").json()
        self.assertEqual([s["ref"] for s in listed], ["old.viewer"])
        self.assertEqual(self.targets()[-1], "GET /api/v1/permissions/sets?include_retired=true&pack_ref=old")
        shown = self.ok("permission", "set", "show", "core.admin").out
        self.assertEqual(attune.yaml_loads(shown), self.server.permission_sets[5])
        self.assertEqual(self.targets()[-1], "GET /api/v1/permissions/sets/by-ref/core.admin")
        self.assertEqual(self.ok("permission", "set", "show", "core.admin", "-j").json()["roles"][0]["role"], "admins")
        exported = self.ok("permission", "set", "export", "core.admin").out
        self.assertEqual(exported, "ref: core.admin\nlabel: Admin\ndescription: Everything\ngrants:\n"
                                   "- resource: packs\n  actions:\n  - read\n  - create\n")
        self.assertEqual(self.ok("permission", "set", "export", "ops.operator", "-j").json(),
                         {"ref": "ops.operator", "label": "Operator", "grants": [{"resource": "executions",
                                                                                   "actions": ["read"]}]})
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Permission set 'nope' not found",
                      self.fails(1, "permission", "set", "show", "nope").err)
        before = len(self.server.requests)
        self.assertIn("'standard' is reserved for execution tokens",
                      self.fails(1, "permission", "set", "show", "standard").err)
        self.assertEqual(len(self.server.requests), before)

    def test_set_update_reads_yaml_or_json_and_checks_it(self):
        definition = os.path.join(self.tmp, "operator.yaml")
        exported = self.ok("permission", "set", "export", "ops.operator").out
        with open(definition, "w") as f:
            f.write(exported.replace("  - read\n", "  - read\n  - cancel\n") + "description: |\n  Runs things.\n")
        dry = self.ok("permission", "set", "update", "ops.operator", "--file", definition, "--dry-run", "-j").json()
        self.assertEqual((dry["operation"], dry["target"], dry["dry_run"], dry["changed"], dry["would_change"]),
                         ("set_update", {"permission_set_ref": "ops.operator", "permission_set_id": 6}, True, False,
                          True))
        self.assertEqual(dry["after"]["grants"], [{"resource": "executions", "actions": ["read", "cancel"]}])
        self.assertEqual(self.targets()[-1], "PUT /api/v1/permissions/sets/6?dry_run=true")
        self.assertEqual(self.server.requests[-1].json(), {
            "label": "Operator", "description": "Runs things.\n",
            "grants": [{"resource": "executions", "actions": ["read", "cancel"]}]})
        self.assertEqual(self.server.permission_sets[6]["grants"], [{"resource": "executions", "actions": ["read"]}])
        done = self.ok("permission", "set", "update", "ops.operator", "--file", "-", "-j",
                       stdin=json.dumps({"ref": "ops.operator", "grants": []})).json()
        self.assertEqual((done["changed"], done["after"]["grants"]), (True, []))
        self.assertEqual(self.server.permission_sets[6]["grants"], [])
        self.assertEqual(self.targets()[-1], "PUT /api/v1/permissions/sets/6?dry_run=false")
        result = self.ok("permission", "set", "update", "core.admin", "--file", "-",
                         stdin="ref: core.admin\ngrants: []\n")
        self.assertIn("attune: warning: Pack-owned definition 'core.admin': a later pack update can overwrite this "
                      "edit.", result.err)
        for ref, content, code, message in (
                ("ops.operator", "ref: other\ngrants: []\n", 2, "Definition ref 'other' does not match target "
                                                                "'ops.operator'"),
                ("ops.operator", "ref: ops.operator\ngrants: {}\n", 2, "Permission set grants must be an array"),
                ("ops.operator", "ref: ops.operator\n", 2, "Invalid permission set definition: it needs ref and grants"),
                ("ops.operator", "ref: ops.operator\ngrants: []\nowner: me\n", 2,
                 "Invalid permission set definition: unknown field 'owner'"),
                ("ops.operator", "- a\n", 2, "Invalid permission set definition: it must be a mapping"),
                ("ops.operator", "ref: ops.operator\ngrants: [\n", 2, "Invalid permission set definition: stdin:2:9: "
                                                                      "this sequence never ends"),
                ("ops.operator", "ref: &a ops.operator\n", 2, "stdin:1:6: anchors are not supported"),
                ("system.root", "ref: system.root\ngrants: []\n", 1,
                 "Permission set 'system.root' is platform-managed and cannot be updated"),
                ("old.viewer", "ref: old.viewer\ngrants: []\n", 1,
                 "Permission set 'old.viewer' is retired and cannot be updated")):
            with self.subTest(content=content):
                self.assertIn(message, self.fails(code, "permission", "set", "update", ref, "--file", "-",
                                                  stdin=content).err)
        self.assertIn("Failed to read permission set definition", self.fails(
            2, "permission", "set", "update", "ops.operator", "--file", os.path.join(self.tmp, "missing.yaml")).err)
        self.fails(2, "permission", "set", "update", "ops.operator")

    def test_assignment_list(self):
        created = attune.format_timestamp(self.server.identities[1]["direct_permissions"][0]["created"])
        self.assertEqual(self.lines("permission", "assignment", "list"), [
            "ID  Permission set  Target type  Target  Created", "──  ──────────────  ───────────  ──────  " + "─" * 19,
            "21  core.admin      identity     admin   " + created, "51  core.admin      role         admins  " + created])
        self.assertEqual(self.targets()[0], "GET /api/v1/permissions/assignments?page=1&page_size=50")
        page = self.ok("permission", "assignment", "list", "--role", "admins", "--set", "core.admin", "--page", "1",
                       "--per-page", "10", "-j").json()
        self.assertEqual([b["id"] for b in page["items"]], [51])
        self.assertEqual(page["pagination"]["total_items"], 1)
        self.assertEqual(self.targets()[-1], "GET /api/v1/permissions/assignments?role=admins&permission_set_ref="
                                             "core.admin&page=1&page_size=10")
        self.ok("permission", "assignment", "list", "--identity", "admin")
        self.assertEqual(self.targets()[-1], "GET /api/v1/permissions/assignments?identity_login=admin&page=1&"
                                             "page_size=50")
        self.assertIn("No permission assignments found", self.ok("permission", "assignment", "list", "--role",
                                                                 "nobody").out)
        self.assertIn("filter by one of --identity, --identity-id and --role",
                      self.fails(2, "permission", "assignment", "list", "--identity", "a", "--role", "b").err)
        self.fails(2, "permission", "assignment", "list", "--per-page", "101")
        self.assertIn("permission assignment needs a command", self.fails(2, "permission", "assignment").err)

    def test_assign_and_revoke_identities_and_roles(self):
        dry = self.ok("permission", "assign", "ops.operator", "--identity", "zoe", "--dry-run", "-j").json()
        self.assertEqual(dry, {"operation": "assign", "dry_run": True, "changed": False, "would_change": True,
                               "target": {"permission_set_ref": "ops.operator",
                                          "assignee": {"type": "identity", "identity_id": 3, "login": "zoe"}},
                               "before": False, "after": True})
        self.assertEqual([r.method for r in self.server.requests if r.method != "GET"], [])
        done = self.ok("permission", "assign", "ops.operator", "--identity-id", "3", "-j").json()
        self.assertEqual((done["changed"], done["before"]), (True, False))
        self.assertEqual(self.sent("POST", "/api/v1/permissions/assignments").json(),
                         {"identity_id": 3, "permission_set_ref": "ops.operator"})
        again = self.ok("permission", "assign", "ops.operator", "--identity", "zoe", "-j").json()
        self.assertEqual((again["changed"], again["would_change"]), (False, False))
        self.assertEqual(self.server.count("POST", "/api/v1/permissions/assignments"), 1)
        revoked = self.ok("permission", "revoke", "ops.operator", "--identity", "zoe", "-j").json()
        self.assertEqual((revoked["operation"], revoked["changed"], revoked["before"], revoked["after"]),
                         ("revoke", True, True, False))
        self.assertEqual(self.server.identities[3]["direct_permissions"], [])
        self.assertFalse(self.ok("permission", "revoke", "ops.operator", "--identity", "zoe", "-j").json()["changed"])
        role = self.ok("permission", "assign", "ops.operator", "--role", "operators", "-j").json()
        self.assertEqual(role["target"]["assignee"], {"type": "role", "role": "operators"})
        self.assertEqual(self.sent("POST", "/api/v1/permissions/sets/6/roles").json(), {"role": "operators"})
        mapping = self.server.permission_sets[6]["roles"][0]["id"]
        self.assertTrue(self.ok("permission", "revoke", "ops.operator", "--role", "operators", "-j").json()["changed"])
        self.assertEqual(self.targets()[-1], "DELETE /api/v1/permissions/sets/roles/%d" % mapping)
        self.assertIn("Permission set 'old.viewer' is retired and cannot be newly assigned",
                      self.fails(1, "permission", "assign", "old.viewer", "--role", "x").err)
        for command in ("assign", "revoke"):
            for target in ((), ("--identity", "zoe", "--role", "x"), ("--identity", "zoe", "--identity-id", "3"),
                           ("--role", " ")):
                self.server.requests.clear()
                self.assertIn("Specify exactly one of --identity, --identity-id, or a nonempty --role",
                              self.fails(2, "permission", command, "core.executor", *target).err)
                self.assertEqual(self.targets(), [])  # said before anything is asked of the server
        self.assertIn("Identity 'ghost' not found",
                      self.fails(1, "permission", "assign", "ops.operator", "--identity", "ghost").err)

    def test_a_race_and_a_missing_has_next(self):
        # someone else assigns between the look-up and the POST: the 409 and the binding now there mean success
        def meanwhile():
            self.server.identities[3]["direct_permissions"].append({
                "id": 99, "identity_id": 3, "permission_set_id": 6, "permission_set_ref": "ops.operator",
                "created": self.server.stamp()})
        self.server.fail("/api/v1/permissions/assignments", "POST", *api_error(409, "Permission assignment already "
                                                                                "exists", "CONFLICT"), effect=meanwhile)
        result = self.ok("permission", "assign", "ops.operator", "--identity", "zoe", "-j").json()
        self.assertEqual((result["before"], result["changed"]), (True, False))
        # a 409 with nothing there is the server's error
        self.server.fail("/api/v1/permissions/sets/6/roles", "POST", *api_error(409, "Busy", "CONFLICT"))
        self.assertIn("API error (409 Conflict, code CONFLICT): Busy",
                      self.fails(1, "permission", "assign", "ops.operator", "--role", "x").err)
        # gone between the look-up and the DELETE: revoked all the same
        self.server.fail("/api/v1/permissions/assignments/99", "DELETE", effect=lambda: self.server.identities[3][
            "direct_permissions"].clear(), *api_error(404, "Permission assignment '99' not found", "NOT_FOUND"))
        result = self.ok("permission", "revoke", "ops.operator", "--identity", "zoe", "-j").json()
        self.assertEqual((result["before"], result["changed"]), (False, False))
        self.server.fail("/api/v1/permissions/assignments", "GET", 200, {"items": [], "pagination": {"page": 1}})
        self.assertIn("API pagination is missing has_next",
                      self.fails(1, "permission", "assign", "ops.operator", "--role", "x").err)

    def test_forbidden(self):
        self.server.fail("/api/v1/permissions/sets", "GET", *api_error(403, "Insufficient permissions", "FORBIDDEN"))
        self.assertIn("API error (403 Forbidden, code FORBIDDEN): Insufficient permissions",
                      self.fails(1, "permission", "set", "list").err)


class QueueCommandTests(ResourceTestCase):
    def test_list_and_show(self):
        lines = self.lines("queue", "list")
        self.assertEqual(lines[0].split(), ["ID", "Ref", "Pack", "Label", "Enabled", "Accepting", "Dispatch", "action",
                                            "Created"])
        self.assertEqual(lines[2].split()[:6], ["2", "adhoc.scratch", "-", "Scratch", "✗", "✓"])
        self.assertEqual(self.targets(), ["GET /api/v1/queues?page=1&per_page=50"])
        page = self.ok("queue", "list", "--pack", "core", "--enabled", "true", "--is-adhoc", "false", "--search",
                       "inbox", "--referencing-pack-ref", "ops", "--page", "1", "--per-page", "10", "-j").json()
        self.assertEqual([q["ref"] for q in page["items"]], ["core.inbox"])
        self.assertEqual(page["pagination"]["page_size"], 10)
        self.assertEqual(self.targets()[-1], "GET /api/v1/packs/core/queues?enabled=true&is_adhoc=false&search=inbox&"
                                             "referencing_pack_ref=ops&page=1&per_page=10")
        self.assertEqual(self.ok("queue", "list", "--search", "nothing").out, "ℹ No work queues found.\n")
        self.fails(2, "queue", "list", "--per-page", "0")
        self.fails(2, "queue", "list", "--enabled", "maybe")
        self.assertIn("Pack 'nope' not found", self.fails(1, "queue", "list", "--pack", "nope").err)
        out = self.ok("queue", "show", "core.inbox").out
        self.assertTrue(out.startswith("Queue: core.inbox\n─────────────────\nRef:                   core.inbox\n"), out)
        for row in ("Pack:                  core", "Description:           Work for core.echo", "Enabled:               ✓",
                    "Reference Visibility:  restricted", "Allowed Pack Refs:     ops, deploy",
                    "Dispatch Action:       core.echo", "Trace Tag Template:    -"):
            self.assertIn(row + "\n", out)
        self.assertEqual(self.ok("queue", "show", "adhoc.scratch", "-j").json()["trace_tag_template"],
                         "scratch.{{ queue_item.id }}")
        self.assertIn("Pack:                  -", self.ok("queue", "show", "adhoc.scratch").out)
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Work queue 'a/b' not found",
                      self.fails(1, "queue", "show", "a/b").err)
        self.assertEqual(self.targets()[-1], "GET /api/v1/queues/a%2Fb")

    def test_enable_disable_update(self):
        out = self.ok("queue", "enable", "adhoc.scratch").out
        self.assertTrue(out.startswith("✓ Queue 'adhoc.scratch' enabled successfully\nRef:"), out)
        self.assertEqual(self.sent("PUT", "/api/v1/queues/adhoc.scratch").json(), {"enabled": True})
        self.assertFalse(self.ok("queue", "disable", "adhoc.scratch", "-j").json()["enabled"])
        self.assertEqual(self.server.requests[-1].json(), {"enabled": False})
        self.assertIn("✓ Queue 'core.inbox' updated successfully",
                      self.ok("queue", "update", "core.inbox", "--trace-tag-template", "inbox.{{ queue_item.id }}").out)
        self.assertEqual(self.server.requests[-1].json(), {"trace_tag_template": "inbox.{{ queue_item.id }}"})
        self.ok("queue", "update", "core.inbox", "--clear-trace-tag-template")
        self.assertEqual(self.server.requests[-1].json(), {"trace_tag_template": None})
        self.assertIsNone(self.server.queues["core.inbox"]["trace_tag_template"])
        self.assertIn("At least one field must be provided to update", self.fails(2, "queue", "update", "core.inbox").err)
        self.fails(2, "queue", "update", "core.inbox", "--trace-tag-template", "x", "--clear-trace-tag-template")

    def test_enqueue(self):
        item = self.ok("queue", "enqueue", "core.inbox", "--request-json", '{"payload": {"order": 9}, "priority": 5}',
                       "-j").json()
        self.assertEqual((item["status"], item["payload"], item["priority"]), ("queued", {"order": 9}, 5))
        self.assertEqual(self.sent("POST", "/api/v1/queues/core.inbox/items").json(),
                         {"payload": {"order": 9}, "priority": 5, "metadata": {}})
        request = os.path.join(self.tmp, "item.yaml")
        with open(request, "w") as f:
            f.write("payload:\n  order: 10\nitem_key: order-10\nmetadata: {source: cli}\ntrace_tag: t.10\n")
        out = self.ok("queue", "enqueue", "core.inbox", "--request-file", request).out
        self.assertIn("Item key:                  order-10\nStatus:                    queued\n", out)
        self.assertEqual(self.server.requests[-1].json(), {"payload": {"order": 10}, "item_key": "order-10",
                                                           "metadata": {"source": "cli"}, "trace_tag": "t.10"})
        self.ok("queue", "enqueue", "core.inbox", "--request-file", "-", stdin='{"payload": null}')
        self.assertEqual(self.server.requests[-1].json(), {"payload": None, "metadata": {}})
        prefix = ("Enqueue request must be valid JSON with payload and optional item_key, priority, metadata, and "
                  "trace_tag fields: ")
        for text, problem in (("{bad", "it is not valid JSON"), ("[]", "it is not an object"),
                              ('{"priority": 1}', "payload is missing"),
                              ('{"payload": 1, "color": "red"}', "unknown field 'color'")):
            self.assertIn(prefix + problem, self.fails(2, "queue", "enqueue", "core.inbox", "--request-json", text).err)
        self.assertIn("give exactly one of --request-json and --request-file",
                      self.fails(2, "queue", "enqueue", "core.inbox").err)
        self.server.queues["core.inbox"]["accepting_new_items"] = False
        self.assertIn("is not accepting new items", self.fails(1, "queue", "enqueue", "core.inbox", "--request-json",
                                                               '{"payload": 1}').err)

    def test_items_list_and_show_never_print_the_lease_token(self):
        lease = self.server.queue_items[2]["lease_token"]
        lines = self.lines("queue", "items", "core.inbox", "list")
        self.assertEqual(lines[0].split(), ["ID", "Key", "Status", "Priority", "Attempts", "Payload", "Created"])
        self.assertEqual(lines[2].split()[:5], ["1", "order-1", "queued", "0", "0"])
        self.assertIn('{"order":3,"note":"' + "x" * 76 + "…  ", lines[4])  # cut to 96
        self.assertEqual(self.targets(), ["GET /api/v1/queues/core.inbox/items?page=1&per_page=50"])
        page = self.ok("queue", "items", "core.inbox", "list", "--status", "leased", "--status", "retry",
                       "--item-key", "order-2", "--enqueue-source", "api", "--per-page", "5", "-j").json()
        self.assertEqual(([i["id"] for i in page["items"]], page["items"][0]["lease_token"]), ([2], "***"))
        self.assertEqual(self.targets()[-1], "GET /api/v1/queues/core.inbox/items?item_key=order-2&enqueue_source=api&"
                                             "statuses=leased&statuses=retry&page=1&per_page=5")
        self.assertEqual(self.ok("queue", "items", "core.inbox", "list", "--status", "failed").out,
                         "ℹ No queue items found.\n")
        self.fails(2, "queue", "items", "core.inbox", "list", "--status", "lost")
        shown = self.ok("queue", "items", "core.inbox", "show", "2").out
        for row in ("ID:                        2", "Queue:                     core.inbox",
                    "Lease token:               ***", "Leased execution:          7", "Attempts:                  1",
                    'Payload:                   {"order":2,"customer":"bob"}', "Last error:                -"):
            self.assertIn(row + "\n", shown)
        for output in ("-j", "-y"):
            self.assertNotIn(lease, self.ok("queue", "items", "core.inbox", "show", "2", output).out)
            self.assertNotIn(lease, self.ok("queue", "items", "core.inbox", "list", output).out)
        self.assertIsNone(self.ok("queue", "items", "core.inbox", "show", "1", "-j").json()["lease_token"])
        self.assertIn("Work queue item 9 not found", self.fails(1, "queue", "items", "core.inbox", "show", "9").err)

    def test_show_finds_the_item_in_the_list(self):
        """The server has no GET for one item (PUT and DELETE only): show reads the list,
        page after page, and stops at the page that holds it."""
        for n in range(4, 251):
            self.server.queue_items[n] = dict(self.server.queue_items[1], id=n, item_key="k%d" % n)
        self.assertEqual(self.server.handle(Seen("GET", "/api/v1/queues/core.inbox/items/1", {
            "Authorization": "Bearer " + self.server.mint("admin")}, b""))[0], 405)
        self.server.requests.clear()
        self.assertEqual(self.ok("queue", "items", "core.inbox", "show", "150", "-j").json()["item_key"], "k150")
        self.assertEqual(self.targets(), ["GET /api/v1/queues/core.inbox/items?page=1&per_page=100",
                                          "GET /api/v1/queues/core.inbox/items?page=2&per_page=100"])
        self.server.requests.clear()
        self.assertIn("Work queue item 999 not found in queue 'core.inbox'",
                      self.fails(1, "queue", "items", "core.inbox", "show", "999").err)
        self.assertEqual(len(self.targets()), 3)
        self.server.requests.clear()
        self.assertIn("not found", self.fails(1, "queue", "items", "adhoc.scratch", "show", "1").err)
        self.assertEqual(self.targets(), ["GET /api/v1/queues/adhoc.scratch/items?page=1&per_page=100"])
        self.assertIn("queue items REF needs a command", self.fails(2, "queue", "items", "core.inbox").err)

    def test_preview_and_apply(self):
        out = self.ok("queue", "items", "core.inbox", "preview", "--selector", "$.payload.customer").out
        self.assertTrue(out.startswith("Queue Item Selector Preview\n───────────────────────────\nMatched:    1\n"
                                       "Previewed:  1\nID"), out)
        self.assertEqual(self.sent("POST", "/api/v1/queues/core.inbox/items/query/preview").json(),
                         {"selector": {"path": "$.payload.customer", "vars": {}}, "limit": 100})
        self.assertEqual(self.ok("queue", "items", "core.inbox", "preview", "--selector", "$.payload.none").out
                         .splitlines()[-1], "ℹ No matching pending queue items.")
        out = self.ok("queue", "items", "core.inbox", "update", "--selector", "$", "--vars-json", '{"n": 1}',
                      "--patch-json", '{"flag": true}', "--preview-limit", "1").out
        self.assertTrue(out.startswith("✓ Applied update to 2 pending queue item(s)\nOperation:  update\nMatched:    2\n"
                                       "Affected:   2\nSkipped:    0\nPreviewed:  1\n"), out)
        self.assertEqual(self.server.requests[-1].json(), {"selector": {"path": "$", "vars": {"n": 1}},
                                                           "operation": "patch_payload", "preview_limit": 1,
                                                           "payload_patch": {"flag": True}})
        self.assertTrue(self.server.queue_items[1]["payload"]["flag"])
        result = self.ok("queue", "items", "core.inbox", "reprioritize", "--selector", "$", "--priority", "-3",
                         "-j").json()
        self.assertEqual((result["operation"], result["affected_count"]), ("reprioritize", 2))
        self.assertEqual(self.server.requests[-1].json()["priority"], -3)
        self.assertIn("✓ Applied delete/cancel to 2 pending queue item(s)",
                      self.ok("queue", "items", "core.inbox", "cancel", "--selector", "$").out)
        self.assertEqual(self.server.queue_items[1]["status"], "cancelled")
        self.assertEqual(self.server.requests[-1].json()["operation"], "cancel")
        self.ok("queue", "items", "core.inbox", "delete", "--selector", "$")
        for argv, message in ((("preview", "--selector", "$", "--vars-json", "{x"), "Invalid JSON for --vars-json"),
                              (("preview", "--selector", "$", "--vars-json", "[1]"), "--vars-json must be a JSON object"),
                              (("update", "--selector", "$", "--patch-json", "1"), "--patch-json must be a JSON object"),
                              (("preview", "--selector", "$", "--limit", "101"), "expected a whole number from 1 to 100"),
                              (("update", "--selector", "$"), "--patch-json"),
                              (("reprioritize", "--selector", "$", "--priority", "high"), "expected a whole number")):
            self.assertIn(message, self.fails(2, "queue", "items", "core.inbox", *argv).err)
        self.assertIn("Invalid SQL/JSONPath selector",
                      self.fails(1, "queue", "items", "core.inbox", "preview", "--selector", "oops").err)


class ForbiddenTests(ResourceTestCase):
    def test_the_new_groups_say_forbidden_in_one_line(self):
        """A 403 from each group's routes is the server's error line, exit 1, nothing on stdout."""
        for argv, method, path in (
                (("inquiry", "list"), "GET", "/api/v1/inquiries"),
                (("artifact", "list"), "GET", "/api/v1/artifacts"),
                (("identity", "list"), "GET", "/api/v1/identities"),
                (("permission", "assignment", "list"), "GET", "/api/v1/permissions/assignments"),
                (("queue", "list"), "GET", "/api/v1/queues"),
                (("queue", "enqueue", "core.inbox", "--request-json", '{"payload": 1}'), "POST",
                 "/api/v1/queues/core.inbox/items"),
                (("policy", "list"), "GET", "/api/v1/policies"),
                (("audit", "list"), "GET", "/api/v1/audit-events"),
                (("cache", "namespace", "list", "--owner-type", "system"), "GET", "/api/v1/cache/namespaces")):
            with self.subTest(argv=argv):
                self.server.fail(path, method, *api_error(403, "Insufficient permissions", "FORBIDDEN"))
                result = self.fails(1, *argv)
                self.assertEqual(result.out, "")
                self.assertRegex(result.err, r"^attune: error: (Cache )?API error \(403 Forbidden, code FORBIDDEN\): "
                                             r"Insufficient permissions \(the server refused this identity; "
                                             r"attune auth whoami shows which one the profile uses\)\n$")


class CacheCommandTests(ResourceTestCase):
    SYSTEM = ("--owner-type", "system")

    def test_the_owner_selector(self):
        for flags, message in ((("--owner-type", "pack"), "--owner-type pack requires exactly --owner-pack-ref"),
                               (("--owner-type", "pack", "--owner-action-ref", "a.b"),
                                "--owner-type pack requires exactly --owner-pack-ref"),
                               (("--owner-type", "system", "--owner-pack-ref", "core"),
                                "--owner-type system requires exactly no owner reference"),
                               (("--owner-type", "identity", "--owner-sensor-ref", "s"),
                                "--owner-type identity requires exactly no owner reference (the current identity is used)"),
                               (("--owner-type", "sensor", "--owner-sensor-ref", "s", "--owner-pack-ref", "p"),
                                "--owner-type sensor requires exactly --owner-sensor-ref")):
            self.assertIn(message, self.fails(2, "cache", "namespace", "show", "users", *flags).err)
        self.fails(2, "cache", "namespace", "show", "users")  # --owner-type is required
        self.fails(2, "cache", "namespace", "show", "users", "--owner-type", "team")
        self.assertEqual(self.server.requests, [])
        self.ok("cache", "namespace", "list", "--owner-type", "pack", "--owner-pack-ref", "core")
        self.assertEqual(self.targets(), ["GET /api/v1/cache/namespaces?owner_type=pack&owner_ref=core"])

    def test_namespaces(self):
        self.assertEqual(self.lines("cache", "namespace", "list", *self.SYSTEM), [
            "Namespace  Owner   Active Gen  Records  Bytes  Stale", "─────────  ──────  ──────────  ───────  ─────  ─────",
            "users      system  101         5        -      ✗"])
        listed = self.ok("cache", "namespace", "list", *self.SYSTEM, "--namespace", "US", "--freshness", "fresh",
                         "--limit", "10", "--cursor", "a/b", "-j").json()
        self.assertEqual(([n["namespace"] for n in listed["namespaces"]], listed["next_cursor"]), (["users"], None))
        self.assertEqual(self.targets()[-1], "GET /api/v1/cache/namespaces?owner_type=system&namespace=US&freshness="
                                             "fresh&limit=10&cursor=a%2Fb")
        self.fails(2, "cache", "namespace", "list", *self.SYSTEM, "--limit", "501")
        out = self.ok("cache", "namespace", "create", "orders", *self.SYSTEM, "--freshness-target-seconds", "60",
                      "--max-retained-generations", "4").out
        self.assertTrue(out.startswith("✓ Cache namespace 'orders' created\nNamespace:                 orders\n"), out)
        self.assertIn("Freshness Target:          60\n", out)
        self.assertEqual(self.sent("POST", "/api/v1/cache/namespaces").json(), {
            "owner_type": "system", "namespace": "orders", "freshness_target_seconds": 60, "max_retained_generations": 4})
        self.assertIn("Cache API error (409 Conflict, code CONFLICT): Cache namespace 'orders' already exists",
                      self.fails(1, "cache", "namespace", "create", "orders", *self.SYSTEM).err)
        shown = self.ok("cache", "namespace", "show", "hosts", "--owner-type", "pack", "--owner-pack-ref", "core").out
        self.assertIn("Owner:                     pack: core\nActive Generation:         -\n", shown)
        self.assertEqual(self.targets()[-1], "GET /api/v1/cache/namespaces/hosts?owner_type=pack&owner_ref=core")
        self.assertIn("Cache namespace 'hosts' not found", self.fails(1, "cache", "namespace", "show", "hosts",
                                                                      *self.SYSTEM).err)
        self.assertIn("Provide at least one mutable policy field to update",
                      self.fails(2, "cache", "namespace", "update", "orders", *self.SYSTEM).err)
        updated = self.ok("cache", "namespace", "update", "orders", *self.SYSTEM, "--max-staging-generations", "1",
                          "-j").json()
        self.assertEqual(updated["max_staging_generations"], 1)
        self.assertEqual(self.server.requests[-1].json(), {"owner_type": "system", "max_staging_generations": 1})
        self.fails(2, "cache", "namespace", "delete", "orders", *self.SYSTEM)  # no terminal, no --yes
        self.assertEqual(self.ok("cache", "namespace", "delete", "orders", *self.SYSTEM, "--yes").out,
                         "✓ Cache namespace 'orders' deleted\n")
        self.assertEqual(self.targets()[-1], "DELETE /api/v1/cache/namespaces/orders?owner_type=system")
        self.assertNotIn(("system", None, "orders"), self.server.cache_namespaces)
        self.assertIn("cache namespace needs a command", self.fails(2, "cache", "namespace").err)

    def test_entries(self):
        out = self.ok("cache", "entry", "get", "users", "u2", *self.SYSTEM).out
        self.assertTrue(out.startswith("ℹ Generation 101\nExternal ID:     u2\n"), out)
        self.assertIn('Value:           {\n                   "name": "user 2",', out)
        self.assertEqual(self.sent("POST", "/api/v1/cache/namespaces/users/entries/lookup").json(), {
            "owner_type": "system", "external_id": "u2", "generation_id": None, "require_fresh": False})
        self.assertEqual(self.ok("cache", "entry", "get", "users", "nope", *self.SYSTEM).out,
                         "ℹ No cache entry found in generation 101\n")
        self.assertEqual(self.ok("cache", "entry", "get", "users", "u1", *self.SYSTEM, "--generation", "101", "-j")
                         .json()["item"]["value"], {"name": "user 1", "n": 1})
        ids = os.path.join(self.tmp, "ids.txt")
        with open(ids, "w") as f:
            f.write("u3\n\n  u4 \nghost\n")
        result = self.ok("cache", "entry", "get-many", "users", *self.SYSTEM, "--external-id", "u1",
                         "--external-id-file", ids)
        self.assertEqual([line.split()[0] for line in result.out.splitlines()[2:]], ["u1", "u3", "u4"])
        self.assertIn("object (2 fields)", result.out)
        self.assertEqual(result.err, "attune: warning: 1 requested external ID(s) were not found\n")
        self.assertEqual(self.server.requests[-1].json()["external_ids"], ["u1", "u3", "u4", "ghost"])
        self.ok("cache", "entry", "get-many", "users", *self.SYSTEM, "--external-id-file", "-", stdin="u5\n")
        self.assertEqual(self.server.requests[-1].json()["external_ids"], ["u5"])
        with open(ids, "w") as f:
            f.write("x\n" * 1001)
        for argv, message in ((("--external-id-file", ids), "entry get-many accepts at most 1000 external IDs"),
                              ((), "Provide at least one --external-id or --external-id-file"),
                              (("--external-id", ""), "External IDs must be non-empty")):
            self.assertIn(message, self.fails(2, "cache", "entry", "get-many", "users", *(self.SYSTEM + argv)).err)

    def test_scan_a_page_or_every_page_as_ndjson(self):
        lines = self.lines("cache", "entry", "scan", "users", *self.SYSTEM, "--page-size", "2", "--include-values")
        self.assertEqual(lines[0].split(), ["External", "ID", "Source", "Updated", "Bytes", "Value", "Full", "Value"])
        self.assertIn('{"name":"user 1","n":1}', lines[2])
        self.assertIn("Next Cursor:        2", lines)
        self.assertEqual(self.targets()[-1], "GET /api/v1/cache/namespaces/users/entries?owner_type=system&limit=2")
        result = self.ok("cache", "entry", "scan", "users", *self.SYSTEM, "--page-size", "2", "--all", "--output",
                         "ndjson")
        self.assertEqual([json.loads(line)["external_id"] for line in result.out.splitlines()],
                         ["u1", "u2", "u3", "u4", "u5"])
        pages = [json.loads(line) for line in result.err.splitlines()]
        self.assertEqual([(p["generation"], p["next_cursor"]) for p in pages], [(101, "2"), (101, "4"), (101, None)])
        self.assertEqual(self.targets()[-2:], [
            "GET /api/v1/cache/namespaces/users/entries?owner_type=system&generation=101&cursor=2&limit=2",
            "GET /api/v1/cache/namespaces/users/entries?owner_type=system&generation=101&cursor=4&limit=2"])
        for argv, message in ((("--all",), "'cache entry scan --all' requires '--output ndjson'"),
                              (("--output", "ndjson"), "--output ndjson requires '--all' for cache entry scans")):
            self.assertIn(message, self.fails(2, "cache", "entry", "scan", "users", *(self.SYSTEM + argv)).err)
        self.fails(2, "cache", "entry", "scan", "users", *self.SYSTEM, "--page-size", "1001")
        before = len(self.server.requests)
        for argv in (("cache", "namespace", "list") + self.SYSTEM, ("pack", "list")):
            self.assertIn("--output ndjson is only supported by 'attune cache entry scan --all'",
                          self.fails(2, *argv, "--output", "ndjson").err)
        self.assertEqual(len(self.server.requests), before)

    def test_a_scan_whose_cursor_answers_itself_is_stopped(self):
        page = {"data": {"generation_id": 101, "items": [], "next_cursor": "c1", "record_count": 5, "stale": False}}
        self.server.fail("/api/v1/cache/namespaces/users/entries", "GET", 200, page, times=None)
        result = self.run_cli("cache", "entry", "scan", "users", *self.SYSTEM, "--all", "--output", "ndjson",
                              "--cursor", "c0")  # stderr holds each page's metadata line first
        self.assertEqual(result.code, 6, result)
        self.assertTrue(result.err.endswith("attune: error: the server answered cursor 'c1' with the same cursor; "
                                            "stopped\n"), result.err)
        self.assertEqual(self.server.count("GET", "/api/v1/cache/namespaces/users/entries"), 2)

    def test_generations_and_a_refresh_step_by_step(self):
        self.assertEqual(self.lines("cache", "generation", "list", "users", *self.SYSTEM)[2].split()[:4],
                         ["101", "active", "5", str(self.server.cache_generations[101]["size_bytes"])])
        self.assertIn("State:                 active\n", self.ok("cache", "generation", "show", "users", "101",
                                                              *self.SYSTEM).out)
        begun = self.ok("cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "1",
                        "--expected-active", "101", "--source-revision", "r2", "-j").json()
        sent = self.sent("POST", "/api/v1/cache/namespaces/users/generations").json()
        self.assertRegex(sent.pop("client_refresh_id"), r"^cli-\d{13}-\d+-\d+$")  # ms, pid, sequence
        self.assertEqual(sent, {"owner_type": "system", "expected_active_generation_id": 101,
                                "expected_chunk_count": 1, "source_revision": "r2"})
        gid = str(begun["generation_id"])
        chunk = os.path.join(self.tmp, "chunk.ndjson")
        with open(chunk, "w") as f:
            f.write('{"external_id": "a", "value": 1, "extra": "dropped"}\r\n\n{"external_id": "b", "value": [2]}\n')
        out = self.ok("cache", "refresh", "upload", "users", gid, *self.SYSTEM, "--chunk-index", "0", "--file", chunk).out
        self.assertTrue(out.startswith("✓ Cache chunk uploaded\nResponse:  {"), out)
        self.assertEqual(self.sent("PUT", "/api/v1/cache/namespaces/users/generations/%s/chunks/0" % gid).json(), {
            "owner_type": "system", "entries": [{"external_id": "a", "value": 1}, {"external_id": "b", "value": [2]}]})
        self.assertIn("✓ generation sealed", self.ok("cache", "refresh", "seal", "users", gid, *self.SYSTEM,
                                                    "--expected-chunk-count", "1", "--expected-count", "2").out)
        self.assertIn("Cache API error (409 Conflict, code CONFLICT): The active generation is 101",
                      self.fails(1, "cache", "refresh", "promote", "users", gid, *self.SYSTEM, "--expect-empty").err)
        self.assertEqual(self.server.count("POST", "/api/v1/cache/namespaces/users/generations/%s/promote" % gid), 1)
        self.assertIn("✓ generation promoted", self.ok("cache", "refresh", "promote", "users", gid, *self.SYSTEM,
                                                      "--expected-active", "101").out)
        self.assertEqual(self.server.cache_namespaces[("system", None, "users")]["active_generation"], int(gid))
        self.assertIn("Specify exactly one of --expected-active or --expect-empty",
                      self.fails(2, "cache", "refresh", "promote", "users", gid, *self.SYSTEM).err)
        staged = self.ok("cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "0",
                         "--expected-active", gid, "--client-refresh-id", "mine", "-j").json()["generation_id"]
        again = self.ok("cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "0",
                        "--expected-active", gid, "--client-refresh-id", "mine", "-j").json()["generation_id"]
        self.assertEqual(staged, again)
        self.assertEqual(self.ok("cache", "refresh", "abort", "users", str(staged), *self.SYSTEM, "--yes").out,
                         "✓ Cache generation '%d' deleted\n" % staged)
        self.assertEqual(self.server.requests[-1].json(), {"owner_type": "system"})
        self.assertEqual(self.server.cache_generations[staged]["status"], "abandoned")
        for content, message in (("", "Upload input contains no records"),
                                 ("[1]\n", "Upload line 1: each upload record must be a JSON object with external_id "
                                           "and value"),
                                 ('{"external_id": "", "value": 1}\n', "Upload line 1: upload records require a "
                                                                       "non-empty external_id"),
                                 ('{"external_id": "x", "value": 1}\n' * 1001, "Upload input exceeds one bounded chunk"),
                                 ('{"external_id": "x", "value": "' + "v" * (1024 * 1024) + '"}\n',
                                  "NDJSON input line 1 exceeds 1048576 bytes")):
            with self.subTest(message=message):
                self.assertIn(message, self.fails(2, "cache", "refresh", "upload", "users", gid, *self.SYSTEM,
                                                  "--chunk-index", "0", "--file", "-", stdin=content).err)

    def test_apply_runs_every_step(self):
        source = os.path.join(self.tmp, "users.ndjson")
        with open(source, "w") as f:
            f.write("".join('{"external_id": "id%d", "value": {"n": %d}}\n' % (n, n) for n in range(5)))
        generation = self.ok("cache", "refresh", "apply", "users", *self.SYSTEM, "--input", source, "--chunk-records",
                             "2", "--expected-active", "101", "--source-revision", "r9", "-j").json()
        self.assertEqual((generation["status"], generation["record_count"]), ("active", 5))
        gid = generation["generation_id"]
        base = "/api/v1/cache/namespaces/users/generations"
        self.assertEqual([t for t in self.targets() if t.startswith(("POST", "PUT"))], [
            "POST " + base, "PUT %s/%d/chunks/0" % (base, gid), "PUT %s/%d/chunks/1" % (base, gid),
            "PUT %s/%d/chunks/2" % (base, gid), "POST %s/%d/seal" % (base, gid), "POST %s/%d/promote" % (base, gid)])
        self.assertEqual(self.sent("POST", base + "/%d/seal" % gid).json(), {
            "owner_type": "system", "expected_chunk_count": 3, "expected_record_count": 5})
        self.assertEqual(self.ok("cache", "entry", "get", "users", "id4", *self.SYSTEM, "-j").json()["item"]["value"],
                         {"n": 4})
        out = self.ok("cache", "refresh", "apply", "users", *self.SYSTEM, "--input", "-", "--expected-chunk-count", "1",
                      "--expected-active", str(gid), stdin='{"external_id": "only", "value": null}\n').out
        self.assertIn("✓ refresh applied and promoted\n", out)
        self.assertIn("--expected-chunk-count is required with --input -",
                      self.fails(2, "cache", "refresh", "apply", "users", *self.SYSTEM, "--input", "-",
                                 "--expect-empty").err)
        self.assertIn("--expected-chunk-count (2) does not match input (3)",
                      self.fails(2, "cache", "refresh", "apply", "users", *self.SYSTEM, "--input", source,
                                 "--chunk-records", "2", "--expected-chunk-count", "2", "--expect-empty").err)
        self.assertIn("Input changed while refresh was applying: expected 3 chunks, uploaded 1",
                      self.fails(1, "cache", "refresh", "apply", "users", *self.SYSTEM, "--input", "-",
                                 "--expected-chunk-count", "3", "--expect-empty", stdin='{"external_id": "a", "value": 1}\n').err)
        self.assertIn("Failed to read upload input", self.fails(2, "cache", "refresh", "apply", "users", *self.SYSTEM,
                                                                "--input", self.tmp, "--expect-empty").err)


    def test_namespace_update_takes_the_refresh_concurrency_alone(self):
        """As the Rust CLI's tests: update with only --refresh-concurrency sends it flat beside
        the owner, and the answer keeps it; nothing else is sent."""
        for policy in ("reuse", "conflict", "parallel"):
            doc = self.ok("-j", "cache", "namespace", "update", "users", *self.SYSTEM, "--refresh-concurrency",
                          policy).json()
            self.assertEqual(self.server.requests[-1].json(), {"owner_type": "system", "refresh_concurrency": policy})
            self.assertEqual(self.server.requests[-1].method + " " + self.server.requests[-1].path,
                             "PUT /api/v1/cache/namespaces/users")
            self.assertEqual(doc["refresh_concurrency"], policy)
        before = len(self.server.requests)
        self.assertIn("invalid choice: 'wait'", self.fails(2, "cache", "namespace", "update", "users", *self.SYSTEM,
                                                           "--refresh-concurrency", "wait").err)
        self.assertEqual(len(self.server.requests), before)

    def test_refresh_concurrency_is_sent_and_shown(self):
        for policy in ("reuse", "conflict", "parallel"):
            out = self.ok("cache", "namespace", "create", "ns-" + policy, "--owner-type", "pack", "--owner-pack-ref",
                          "core", "--refresh-concurrency", policy).out
            self.assertIn("Refresh Concurrency:       %s" % policy, out)
            self.assertEqual(self.server.requests[-1].json(), {"owner_type": "pack", "owner_ref": "core",
                                                               "namespace": "ns-" + policy,
                                                               "refresh_concurrency": policy})
        before = len(self.server.requests)
        self.assertIn("invalid choice: 'wait'", self.fails(2, "cache", "namespace", "create", "x", *self.SYSTEM,
                                                           "--refresh-concurrency", "wait").err)
        self.assertEqual(len(self.server.requests), before)

    def reuse_namespace(self, policy):
        """users with refresh concurrency policy and another writer's refresh staged in it, begun by execution 77."""
        self.server.cache_namespaces[("system", None, "users")]["refresh_concurrency"] = policy
        other = self.server.new_cache_generation(("system", None, "users"), "staging", client_refresh_id="theirs",
                                                 created_by_execution=77)
        return other

    def test_apply_fails_on_a_reused_refresh_and_touches_nothing(self):
        """The server answers the begin with another writer's unpublished generation: apply stops
        there, uploading, sealing, promoting and abandoning nothing (exit 1); begin alone too."""
        other = self.reuse_namespace("reuse")
        source = os.path.join(self.tmp, "users.ndjson")
        with open(source, "w") as f:
            f.write('{"external_id": "a", "value": 1}\n')
        for stdin in (False, True):  # as the Rust CLI's tests: from a file, and from stdin (its chunks counted)
            with self.subTest(stdin=stdin):
                before = len(self.server.requests)
                result = self.fails(1, "cache", "refresh", "apply", "users", *self.SYSTEM, "--expected-active", "101",
                                    "--client-refresh-id", "mine", *(["--input", "-", "--expected-chunk-count", "1"]
                                                                    if stdin else ["--input", source]),
                                    stdin='{"external_id": "a", "value": 1}\n')
                self.assertEqual(result.err, "attune: error: reused generation %d of refresh 'theirs', begun by "
                                 "execution 77 (the namespace's refresh concurrency is reuse): it is another "
                                 "producer's, still unpublished; see it with attune cache generation show users %d "
                                 "--owner-type system; this apply uploaded, sealed and promoted nothing\n"
                                 % (other, other))
                self.assertEqual([r.method + " " + r.path for r in self.server.requests[before:]],
                                 ["POST /api/v1/cache/namespaces/users/generations"])
                sent = self.server.requests[-1].json()
                self.assertEqual((sent["client_refresh_id"], "created_by_execution" in sent), ("mine", False))
                self.assertEqual(self.server.cache_generations[other]["status"], "staging")
        # begin alone prints that generation and exits 0, as the Rust CLI does, with a warning
        before = len(self.server.requests)
        result = self.ok("-j", "cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "1",
                         "--expect-empty", "--client-refresh-id", "mine")
        self.assertEqual({k: v for k, v in result.json().items()},
                         {k: v for k, v in self.server.cache_generations[other].items() if k not in ("key", "chunks")})
        self.assertIn("reused generation %d of refresh 'theirs', begun by execution 77" % other, result.err)
        self.assertEqual(len(self.server.requests), before + 1)
        table = self.ok("cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "1",
                        "--expect-empty").out
        self.assertIn("Created By Execution:  77\n", table)
        self.assertNotIn("staging generation created", table)
        # the same refresh id again is this refresh's own retried begin: it goes on
        self.ok("cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "1",
                "--expect-empty", "--client-refresh-id", "theirs")

    def test_a_refused_begin_names_the_refresh_in_progress(self):
        other = self.reuse_namespace("conflict")
        result = self.fails(1, "cache", "refresh", "begin", "users", *self.SYSTEM, "--expected-chunk-count", "1",
                            "--expect-empty")
        self.assertEqual(result.err, "attune: error: Cache API error (409 Conflict, code cache_refresh_in_progress): "
                         "cache namespace already has an unpublished generation (generation %d, begun by execution "
                         "77)\n" % other)

    def test_generation_show_and_list_say_who_began_it(self):
        other = self.reuse_namespace("parallel")
        out = self.ok("cache", "generation", "show", "users", str(other), *self.SYSTEM).out
        self.assertIn("Created By:            1\n", out)
        self.assertIn("Created By Execution:  77\n", out)
        lines = self.ok("cache", "generation", "list", "users", *self.SYSTEM).out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "State", "Records", "Bytes", "Source", "Revision", "Execution",
                                            "Created"])
        [row] = [line for line in lines[2:] if line.split()[0] == str(other)]
        self.assertEqual(row.split()[5], "77")
        docs = self.ok("-j", "cache", "generation", "list", "users", *self.SYSTEM).json()["generations"]
        self.assertEqual([g["created_by_execution"] for g in docs if g["generation_id"] == other], [77])
        self.assertIn("Created By Execution:  -\n", self.ok("cache", "generation", "show", "users", "101",
                                                          *self.SYSTEM).out)

class AuditCommandTests(ResourceTestCase):
    def test_list_with_every_filter(self):
        lines = self.lines("audit", "list")
        self.assertEqual(lines[0].split(), ["ID", "Created", "Category", "Event", "Type", "Outcome", "Actor", "Resource",
                                            "HTTP"])
        self.assertEqual([line.split()[0] for line in lines[2:]], ["3", "2", "1"])
        self.assertEqual(lines[3].split()[-4:], ["admin", "packs:ci", "POST", "201"])
        self.assertEqual(lines[2].split()[-3:], ["3", "keys", "-"])
        self.assertEqual(self.targets(), ["GET /api/v1/audit-events?page=1&per_page=50"])
        self.ok("audit", "list", "--category", "pack", "--event-type", "pack.created", "--outcome", "success",
                "--actor-login", "admin", "--actor-identity", "1", "--resource-type", "packs", "--resource-id", "4",
                "--resource-ref", "ci", "--http-method", "POST", "--http-status", "201", "--http-path", "/api/v1/packs",
                "--request-id", "6f1c2e34-8a9b-4c1d-9e2f-0a1b2c3d4e5f", "--after", "2026-11-20T00:00:00Z",
                "--before", "2026-11-21T00:00:00Z", "--page", "1", "--per-page", "10")
        self.assertEqual(self.targets()[-1], "GET /api/v1/audit-events?page=1&per_page=10&category=pack"
                         "&event_type=pack.created&outcome=success&actor_login=admin&actor_identity=1"
                         "&resource_type=packs&resource_id=4&resource_ref=ci&http_method=POST&http_status=201"
                         "&http_path=%2Fapi%2Fv1%2Fpacks&request_id=6f1c2e34-8a9b-4c1d-9e2f-0a1b2c3d4e5f"
                         "&created_after=2026-11-20T00%3A00%3A00Z&created_before=2026-11-21T00%3A00%3A00Z")
        self.assertEqual([e["id"] for e in self.ok("audit", "list", "--outcome", "denied", "-j").json()], [3])
        self.assertEqual(self.ok("audit", "list", "--category", "secret").out, "ℹ No audit events found\n")
        for bad in (["--category", "x"], ["--http-status", "99"], ["--per-page", "0"]):
            self.fails(2, "audit", "list", *bad)

    def test_show_and_chain(self):
        out = self.ok("audit", "show", "1").out
        self.assertTrue(out.startswith("Audit Event #1\n──────────────\nID:               1\n"), out)
        self.assertIn("Created:          2026-11-20 10:00:00\n", out)
        self.assertIn("Token Type:       -\n", out)
        self.assertIn('Details\n───────\n{\n  "password": "***",\n  "method": "direct"\n}', out)
        self.assertIn("API error (404 Not Found, code NOT_FOUND): Audit event 9 not found",
                      self.fails(1, "audit", "show", "9").err)
        lines = self.lines("audit", "chain", "6f1c2e34-8a9b-4c1d-9e2f-0a1b2c3d4e5f")
        self.assertEqual(lines[0], "Audit chain for request 6f1c2e34-8a9b-4c1d-9e2f-0a1b2c3d4e5f (2 events)")
        self.assertEqual([line.split()[0] for line in lines[4:]], ["1", "2"])
        self.assertEqual(self.ok("audit", "chain", "00000000-0000-4000-8000-000000000000").out,
                         "ℹ No audit events found for that request id\n")
        self.assertIn("Invalid request id", self.fails(1, "audit", "chain", "not/a-uuid").err)
        self.assertEqual(self.targets()[-1], "GET /api/v1/audit-events/by-request/not%2Fa-uuid")


class PolicyCommandTests(ResourceTestCase):
    def test_list_and_show(self):
        lines = self.lines("policy", "list")
        self.assertEqual(lines[0].split(), ["Ref", "Name", "Scope", "Features", "Priority", "Enabled"])
        self.assertEqual(lines[2].split()[-2:], ["10", "✓"])
        self.assertEqual(self.targets(), ["GET /api/v1/policies"])
        row = self.lines("policy", "list")[2]
        self.assertIn("pack:core", row)
        self.assertIn("concurrency 2/enqueue, rate 30/60s", row)
        self.ok("policy", "list", "--scope", "pack", "--pack", "core", "--enabled", "true", "--tag", "ops")
        self.assertEqual(self.targets()[-1], "GET /api/v1/policies?scope=pack&pack_ref=core&tag=ops&enabled=true")
        self.assertEqual(self.ok("policy", "list", "--scope", "action").out, "ℹ No policies found\n")
        out = self.ok("policy", "show", "core.limit").out
        self.assertIn("Features:     concurrency 2/enqueue, rate 30/60s\nTags:         ops\n", out)
        self.assertIn("Concurrency\n───────────\nLimit:     2\nBehavior:  enqueue\nGroup By:  host\n", out)
        self.assertIn("Rate Limit\n──────────\nMax Executions:  30\nWindow Seconds:  60", out)

    def test_create(self):
        result = self.ok("policy", "create", "--policy-ref", "deploy.serial", "--name", "Serial deploys",
                         "--scope", "action", "--action", "deploy.run", "--concurrency-limit", "1",
                         "--on-concurrency", "cancel", "--group-by", "env", "--rate-limit-max", "5",
                         "--rate-limit-window", "10m", "--quota-running-executions", "3", "--tag", "a", "--tag", "b",
                         "--priority", "-5", "--disabled", "--description", "one at a time")
        self.assertTrue(result.out.startswith("✓ Policy deploy.serial created\n"))
        self.assertEqual(self.server.requests[-1].json(), {
            "ref": "deploy.serial", "name": "Serial deploys", "enabled": False, "priority": -5,
            "scope": {"type": "action", "action_ref": "deploy.run"}, "description": "one at a time",
            "concurrency": {"limit": 1, "method": "cancel", "parameters": {"group_by": ["env"]}},
            "rate_limit": {"max_executions": 5, "window_seconds": 600},
            "quotas": [{"quota_type": "running_executions", "limit": 3}], "tags": ["a", "b"]})
        self.assertIn("Policy with ref 'deploy.serial' already exists", self.fails(
            1, "policy", "create", "--policy-ref", "deploy.serial", "--name", "x", "--scope", "global",
            "--quota-executions-total", "9").err)
        base = ["policy", "create", "--policy-ref", "p", "--name", "n"]
        for extra, message in (
                (["--scope", "global"], "At least one policy feature must be configured"),
                (["--scope", "global", "--tag", "x"], "At least one policy feature must be configured"),
                (["--scope", "pack", "--concurrency-limit", "1"], "--pack is required for pack scope"),
                (["--scope", "action", "--concurrency-limit", "1"], "--action is required for action scope"),
                (["--scope", "global", "--concurrency-limit", "0"], "--concurrency-limit must be greater than zero"),
                (["--scope", "global", "--rate-limit-max", "3"], "must be provided together"),
                (["--scope", "global", "--rate-limit-window", "1h"], "must be provided together"),
                (["--scope", "global", "--rate-limit-max", "3", "--rate-limit-window", "1x"], "expected seconds"),
                (["--scope", "global", "--rate-limit-max", "3", "--rate-limit-window", "-5"], "expected seconds")):
            with self.subTest(extra=extra):
                self.assertIn(message, self.fails(2, *(base + extra)).err)

    def test_update_toggle_and_delete(self):
        self.ok("policy", "update", "core.limit", "--clear-concurrency", "--clear-quotas", "--description", "",
                "--priority", "3", "--rate-limit-max", "1", "--rate-limit-window", "30")
        self.assertEqual(self.server.requests[-1].json(), {
            "rate_limit": {"max_executions": 1, "window_seconds": 30}, "concurrency": None, "quotas": [],
            "priority": 3, "description": None})
        self.assertIn("At least one field", self.fails(2, "policy", "update", "core.limit").err)
        self.assertIn("contradict", self.fails(2, "policy", "update", "core.limit", "--clear-rate-limit",
                                               "--rate-limit-max", "1", "--rate-limit-window", "5").err)
        self.assertEqual(self.ok("policy", "disable", "core.limit").out, "✓ Policy core.limit disabled\n")
        self.assertEqual(self.server.requests[-1].json(), {"enabled": False})
        self.assertEqual(self.ok("policy", "enable", "core.limit").out, "✓ Policy core.limit enabled\n")
        self.assertIn("add --yes", self.fails(2, "policy", "delete", "core.limit").err)
        self.assertEqual(self.ok("policy", "delete", "core.limit", "--yes", "-j").json(), {"deleted": "core.limit"})
        self.assertEqual(self.targets()[-1], "DELETE /api/v1/policies/core.limit")
        self.assertIn("Policy 'core.limit' not found", self.fails(1, "policy", "show", "core.limit").err)


class NewSubcommandTests(ResourceTestCase):
    """The Rust CLI's newer subcommands and flags in groups attune.py already had."""

    def test_action_update(self):
        result = self.ok("action", "update", "core.echo", "--label", "Echo!", "--description", "says it",
                         "--entrypoint", "echo.sh", "--runtime", "2", "--enabled", "false", "--timeout-seconds", "90")
        self.assertEqual(self.sent("PUT", "/api/v1/actions/core.echo").json(), {
            "label": "Echo!", "description": "says it", "entrypoint": "echo.sh", "runtime": 2, "enabled": False,
            "timeout_seconds": {"op": "set", "value": 90}})
        self.assertTrue(result.out.startswith("✓ Action 'core.echo' updated successfully\n"))
        self.assertEqual(self.server.actions["core.echo"]["timeout_seconds"], 90)
        self.ok("action", "update", "core.echo", "--clear-timeout")
        self.assertEqual(self.server.requests[-1].json(), {"timeout_seconds": {"op": "clear"}})
        self.assertIsNone(self.server.actions["core.echo"]["timeout_seconds"])
        self.assertIn("At least one field", self.fails(2, "action", "update", "core.echo").err)
        self.assertIn("contradict", self.fails(2, "action", "update", "core.echo", "--clear-timeout",
                                               "--timeout-seconds", "5").err)

    def test_trigger_update(self):
        result = self.ok("trigger", "update", "core.timer", "--label", "Tick", "--description", "",
                         "--enabled", "true", "--reference-visibility", "restricted",
                         "--reference-allowed-pack-refs", "linux, examples")
        self.assertEqual(self.sent("PUT", "/api/v1/triggers/core.timer").json(), {
            "label": "Tick", "enabled": True, "reference_visibility": "restricted",
            "description": {"op": "set", "value": ""}, "reference_allowed_pack_refs": ["linux", "examples"]})
        self.assertIn("✓ Trigger 'core.timer' updated successfully", result.out)
        self.assertIn("Subscription Visibility:  restricted", result.out)
        self.ok("trigger", "update", "core.timer", "--reference-allowed-pack-refs", " , ", "--label", "x")
        self.assertEqual(self.server.requests[-1].json(), {"label": "x"})
        self.assertIn("At least one field", self.fails(2, "trigger", "update", "core.timer").err)

    def test_trace_report(self):
        eid = self.execute("core.echo")
        self.server.executions[eid]["trace_tag"] = "manual/admin/1"
        out = self.ok("execution", "trace-report", "manual/admin/1").out
        self.assertEqual(self.targets()[-1], "GET /api/v1/traces/manual%2Fadmin%2F1")
        self.assertTrue(out.startswith("Trace Report: manual/admin/1\n"))
        self.assertIn("Executions:        1\nEnforcements:      0\n", out)
        self.assertIn("Origins:           manual\n\n{\n", out)
        report = self.ok("execution", "trace-report", "manual/admin/1", "-j").json()
        self.assertEqual(report["executions"][0]["id"], eid)
        self.assertIn("No trace found", self.fails(1, "execution", "trace-report", "nope").err)

    def test_execution_options(self):
        self.ok("run", "core.echo", "--env", "LEVEL=debug", "--env", "EMPTY=", "--env", "EQ=a=b",
                "--permission-set", "ops.read", "--permission-set", "ops.deploy",
                "--artifact-retention-policy", "days", "--artifact-retention-limit", "7")
        self.assertEqual(self.sent("POST", "/api/v1/executions/execute").json(), {
            "action_ref": "core.echo", "parameters": {}, "env_vars": {"LEVEL": "debug", "EMPTY": "", "EQ": "a=b"},
            "permission_set_refs": ["ops.read", "ops.deploy"], "artifact_retention_policy": "days",
            "artifact_retention_limit": 7})
        self.ok("action", "execute", "core.echo", "--env-json", '{"A": "1"}', "--no-api-token")
        self.assertEqual(self.server.requests[-1].json(), {"action_ref": "core.echo", "parameters": {},
                                                           "env_vars": {"A": "1"}, "permission_set_refs": []})
        for extra, message in ((["--env", "NOEQUALS"], "Expected KEY=VALUE"),
                               (["--env", "=x"], "Environment variable name cannot be empty"),
                               (["--env", "ATTUNE_API_TOKEN=x"], "reserved ATTUNE_ prefix"),
                               (["--env-json", '{"attune_x": "1"}'], "reserved ATTUNE_ prefix"),
                               (["--env-json", '{"A": 1}'], "Invalid --env-json"),
                               (["--env-json", "[]"], "Invalid --env-json"),
                               (["--env", "A=1", "--env-json", "{}"], "contradict"),
                               (["--permission-set", " "], "Permission set refs cannot be empty"),
                               (["--permission-set", "x", "--no-api-token"], "contradict"),
                               (["--artifact-retention-limit", "0"], "--artifact-retention-limit"),
                               (["--artifact-retention-policy", "weeks"], "--artifact-retention-policy")):
            with self.subTest(extra=extra):
                self.assertIn(message, self.fails(2, "run", "core.echo", *extra).err)
        self.assertEqual(self.server.count("POST", "/api/v1/executions/execute"), 2)


class RuleCommandTests(ResourceTestCase):
    def test_list(self):
        self.assertEqual(self.lines("rule", "list")[2],
                         "examples.on_timer  examples  on_timer  core.timer        core.echo     ✓")
        self.ok("rule", "list", "--pack", "linux", "--enabled", "false")
        self.assertEqual(self.targets(), ["GET /api/v1/rules", "GET /api/v1/rules?pack_ref=linux&enabled=false"])
        self.assertEqual([r["ref"] for r in self.ok("rule", "list", "-e", "yes", "-j").json()], ["examples.on_timer"])
        self.fails(2, "rule", "list", "--enabled", "maybe")
        self.server.rules.clear()
        self.assertEqual(self.ok("rule", "list").out, "ℹ No rules found\n")

    def test_list_accepts_a_data_array(self):
        rule = self.server.rules["linux.on_file"]
        self.server.fail("/api/v1/rules", status=200, body={"data": [rule]})
        self.assertEqual(self.ok("rule", "list", "-j").json(), [rule])

    def test_show(self):
        out = self.ok("rule", "show", "examples.on_timer").out
        for text in ("Rule: examples.on_timer", "Trigger:             core.timer", "Trace Tag Template:  -",
                     '\nConditions\n──────────\n{\n  "all": []\n}', '\nAction Parameters\n',
                     '\nTrigger Parameters\n──────────────────\n{\n  "interval": 60\n}'):
            self.assertIn(text, out)

    def test_create(self):
        result = self.ok("rule", "create", "--ref", "examples.on_hook", "--pack", "examples", "--label", "On hook",
                         "--trigger", "core.webhook", "--action", "core.echo", "--description", "d",
                         "--conditions", '{"any": []}', "--action-params", '{"message": "{{ event.body }}"}',
                         "--trigger-params", "{}", "--enabled", "false")
        self.assertEqual(self.sent("POST", "/api/v1/rules").json(), {
            "ref": "examples.on_hook", "pack_ref": "examples", "label": "On hook", "trigger_ref": "core.webhook",
            "action_ref": "core.echo", "description": "d", "conditions": {"any": []},
            "action_params": {"message": "{{ event.body }}"}, "trigger_params": {}, "enabled": False})
        rule = self.server.rules["examples.on_hook"]
        self.assertEqual(result.out.splitlines(), ["✓ Rule 'examples.on_hook' created successfully",
                                                   "ℹ ID: %d" % rule["id"], "ℹ Enabled: false"])
        self.assertIn("attune rule create needs -t/--trigger, -a/--action", self.fails(2, "rule", "create", "--ref", "x").err)
        bad = self.fails(2, "rule", "create", "--ref", "a.b", "--pack", "examples", "--label", "l", "--trigger",
                         "core.timer", "--action", "core.echo", "--conditions", "{nope")
        self.assertIn("--conditions is not valid JSON", bad.err)
        self.assertIn("Trigger 'no.trigger' not found", self.fails(
            1, "rule", "create", "--ref", "a.b", "--pack", "examples", "--label", "l", "--trigger", "no.trigger",
            "--action", "core.echo").err)

    def test_create_with_the_rust_clis_flags(self):
        """-n/--name, -p/--pack (the pack after `rule create`), -t, -a, -d, --criteria, --enabled alone."""
        self.ok("rule", "create", "-n", "on_tick", "-p", "examples", "-t", "core.timer", "-a", "core.echo",
                "-d", "every tick", "--criteria", '{"all": []}', "--trace-tag-template", "tick-{{ event.id }}",
                "--enabled")
        self.assertEqual(self.server.requests[-1].json(), {
            "ref": "examples.on_tick", "pack_ref": "examples", "label": "on_tick", "trigger_ref": "core.timer",
            "action_ref": "core.echo", "description": "every tick", "conditions": {"all": []}, "enabled": True,
            "trace_tag_template": "tick-{{ event.id }}"})
        self.assertEqual(self.server.rules["examples.on_tick"]["trace_tag_template"], "tick-{{ event.id }}")
        self.ok("-p", "default", "rule", "create", "--name", "linux.on_boot", "--trigger", "core.timer",
                "--action", "core.echo")
        self.assertEqual(self.server.requests[-1].json()["pack_ref"], "linux")
        for extra, message in ((["--ref", "a.b", "-n", "b"], "one of them"), ([], "one of them"),
                               (["-n", "plain"], "--pack is required")):
            with self.subTest(extra=extra):
                self.assertIn(message, self.fails(2, "rule", "create", "-t", "core.timer", "-a", "core.echo",
                                                  *extra).err)
        self.ok("rule", "update", "examples.on_tick", "--clear-trace-tag-template")
        self.assertEqual(self.server.requests[-1].json(), {"trace_tag_template": None})
        self.fails(2, "rule", "update", "examples.on_tick", "--clear-trace-tag-template", "--trace-tag-template", "x")

    def test_update(self):
        result = self.ok("rule", "update", "linux.on_file", "--label", "New", "--enabled", "true",
                         "--action-params", '{"x": 1}')
        self.assertEqual(self.sent("PUT", "/api/v1/rules/linux.on_file").json(),
                         {"action_params": {"x": 1}, "enabled": True, "label": "New"})
        self.assertIn("✓ Rule 'linux.on_file' updated successfully", result.out)
        self.assertIn("Label:               New", result.out)
        self.assertIn("At least one field", self.fails(2, "rule", "update", "linux.on_file").err)

    def test_enable_disable_use_the_servers_routes(self):
        self.assertEqual(self.ok("rule", "disable", "examples.on_timer").out,
                         "✓ Rule 'examples.on_timer' disabled\n")
        request = self.sent("POST", "/api/v1/rules/examples.on_timer/disable")
        self.assertEqual(request.body, b"")
        self.assertFalse(self.server.rules["examples.on_timer"]["enabled"])
        self.assertTrue(self.ok("rule", "enable", "examples.on_timer", "-j").json()["enabled"])
        self.assertEqual(self.server.count("PATCH"), 0)

    def test_delete(self):
        self.assertEqual(self.ok("rule", "delete", "linux.on_file", "--yes").out,
                         "✓ Rule 'linux.on_file' deleted successfully\n")
        self.assertEqual(self.targets(), ["DELETE /api/v1/rules/linux.on_file"])


class TriggerAndSensorCommandTests(ResourceTestCase):
    def test_trigger_list_show_toggle_delete(self):
        lines = self.lines("trigger", "list")
        self.assertEqual(lines[0], "Ref               Pack   Label       Enabled  Visibility  Description")
        self.assertEqual(len(self.ok("trigger", "list", "--pack", "core", "-j").json()), 2)
        self.assertEqual(self.targets(), ["GET /api/v1/triggers", "GET /api/v1/packs/core/triggers"])
        out = self.ok("trigger", "show", "core.webhook").out
        self.assertIn("Webhook Enabled:          ✓", out)
        self.assertIn("\nWebhook\n───────\nℹ Key: *** (shown once, by trigger webhook enable or regenerate)\n", out)
        result = self.ok("trigger", "disable", "core.timer")
        self.assertEqual(self.sent("POST", "/api/v1/triggers/core.timer/disable").json(), {})
        self.assertIn("✓ Trigger 'core.timer' disabled successfully", result.out)
        self.assertTrue(self.ok("trigger", "enable", "core.timer", "-j").json()["enabled"])
        self.assertEqual(self.ok("trigger", "delete", "core.timer", "--yes", "-j").json(),
                         {"message": "Trigger deleted successfully"})
        self.server.triggers.clear()
        self.assertEqual(self.ok("trigger", "list").out, "ℹ No triggers found\n")

    def test_sensor_list_show_toggle(self):
        self.assertIn("core.timer_sensor        core   timer_sensor       core.timer        ✓",
                      self.ok("sensor", "list").out)
        self.assertEqual([s["ref"] for s in self.ok("sensor", "list", "--pack", "linux", "-j").json()],
                         ["linux.file_watch_sensor"])
        self.assertIn("GET /api/v1/packs/linux/sensors", self.targets())
        self.assertIn("Entry Point:  sensor.py", self.ok("sensor", "show", "core.timer_sensor").out)
        self.assertIn("✓ Sensor 'core.timer_sensor' disabled successfully",
                      self.ok("sensor", "disable", "core.timer_sensor").out)
        self.assertEqual(self.sent("POST", "/api/v1/sensors/core.timer_sensor/disable").json(), {})
        self.ok("sensor", "enable", "core.timer_sensor")
        self.assertTrue(self.server.sensors["core.timer_sensor"]["enabled"])


class KeyCommandTests(ResourceTestCase):
    extra_secrets = {"hunter2", "s3cr3t-value"}

    def test_list(self):
        lines = self.lines("key", "list")
        self.assertEqual(lines[0], "Ref             Name         Owner    Encrypted  Created")
        self.assertIn("linux_token     Linux token  pack: 2  ✓          2026-11-01 12:00:00", lines)
        self.ok("key", "list", "--owner-type", "pack", "--owner", "2")
        self.assertEqual(self.targets(), ["GET /api/v1/keys?page=1&per_page=50",
                                          "GET /api/v1/keys?page=1&per_page=50&owner_type=pack&owner=2"])
        self.ok("key", "list", "--all")
        self.assertEqual(self.targets()[-1], "GET /api/v1/keys?page=1&per_page=100")

    def test_show_never_asks_the_server_to_decrypt(self):
        out = self.ok("key", "show", "db_credentials").out
        self.assertEqual(self.targets(), ["GET /api/v1/keys/db_credentials"])
        self.assertIn("Value:      [REDACTED]", out)
        self.assertIn("(use --decrypt / -d to reveal the actual value)", out)
        plain = self.ok("key", "show", "region").out
        self.assertNotIn("eu-west-1", plain)
        self.assertIn("Value (SHA-256 of canonical JSON):  sha256:" + hashlib.sha256(b'"eu-west-1"').hexdigest(),
                      plain)
        data = self.ok("key", "show", "region", "-j").json()
        self.assertTrue(data["value"].startswith("sha256:"))
        self.assertEqual(self.ok("key", "show", "db_credentials", "-j").json()["value"], "[REDACTED]")

    def test_show_decrypt(self):
        out = self.ok("key", "show", "db_credentials", "--decrypt", secrets_ok=True).out
        self.assertEqual(self.targets(), ["GET /api/v1/keys/db_credentials?decrypt=true"])
        self.assertIn('Value:      {\n              "user": "svc",\n              "pass": "hunter2"\n            }',
                      out)
        self.assertEqual(self.ok("key", "show", "region", "-d", "-j").json()["value"], "eu-west-1")

    def test_refs_are_encoded_in_paths(self):
        self.server.keys["a b/c"] = dict(self.server.keys["region"], ref="a b/c")
        self.ok("key", "show", "a b/c")
        self.assertEqual(self.server.requests[-1].target, "/api/v1/keys/a%20b%2Fc")

    def test_create(self):
        result = self.ok("key", "create", "--ref", "api", "--name", "API", "--value", '{"user": "a"}', "-e")
        self.assertEqual(self.sent("POST", "/api/v1/keys").json(), {
            "ref": "api", "owner_type": "system", "name": "API", "value": {"user": "a"}, "encrypted": True})
        self.assertIn("process list", result.err)
        self.assertIn("✓ Key 'api' created successfully", result.out)
        self.assertIn("Owner:      system", result.out)
        self.ok("key", "create", "--ref", "stdin", "--name", "S", "--value-stdin", "--owner-type", "identity",
                "--owner", "7", stdin="s3cr3t-value\n")
        self.assertEqual(self.server.requests[-1].json(), {
            "ref": "stdin", "owner_type": "identity", "owner": "7", "name": "S", "value": "s3cr3t-value",
            "encrypted": False})
        data = self.ok("key", "create", "--ref", "num", "--name", "N", "--value", "42", "-j").json()
        self.assertEqual((self.server.keys["num"]["value"], "value" in data), (42, False))

    def test_create_usage_errors(self):
        base = ("key", "create", "--ref", "k", "--name", "K")
        bad_owner = self.fails(2, *(base + ("--value", "1", "--owner-type", "team")))
        self.assertIn("Invalid owner type 'team'", bad_owner.err)
        self.assertIn("a value is needed", self.fails(2, *base).err)
        self.fails(2, *(base + ("--value", "1", "--value-stdin")), stdin="2")
        self.assertIn("Key with ref 'region' already exists",
                      self.fails(1, "key", "create", "--ref", "region", "--name", "R", "--value", "x").err)

    def test_create_with_a_local_ref_and_list_pages(self):
        self.ok("key", "create", "--local-ref", "token", "--name", "T", "--value", "v", "--owner-type", "pack",
                "--owner-pack-ref", "linux")
        self.assertEqual(self.server.requests[-1].json(), {
            "local_ref": "token", "owner_type": "pack", "owner_pack_ref": "linux", "name": "T", "value": "v",
            "encrypted": False})
        self.assertIn("pack.linux.token", self.server.keys)
        self.ok("key", "create", "--local-ref", "global", "--name", "G", "--value", "1")
        self.assertIn("system.global", self.server.keys)
        for extra, message in ((["--local-ref", "a.b", "--value", "1"], "without dots"),
                               (["--local-ref", "x", "--value", "1", "--owner-type", "identity"],
                                "--owner-type identity needs --owner-identity-login"),
                               (["--local-ref", "x", "--value", "1", "--owner-pack-ref", "p"],
                                "--owner-type system needs no owner ref"),
                               (["--ref", "r", "--value", "1", "--owner-pack-ref", "p"], "go with --local-ref"),
                               (["--ref", "r", "--local-ref", "x", "--value", "1"], "one of them"),
                               (["--value", "1"], "one of them")):
            with self.subTest(extra=extra):
                self.assertIn(message, self.fails(2, "key", "create", "--name", "N", *extra).err)
        self.ok("key", "list", "--page", "2", "--per-page", "10")
        self.assertEqual(self.targets()[-1], "GET /api/v1/keys?page=2&per_page=10")
        self.fails(2, "key", "list", "--per-page", "101")

    def test_update_and_delete(self):
        result = self.ok("key", "update", "region", "--name", "Region!", "--value", "us-east-1", "--encrypted", "true")
        self.assertEqual(self.sent("PUT", "/api/v1/keys/region").json(),
                         {"name": "Region!", "value": "us-east-1", "encrypted": True})
        self.assertIn("✓ Key 'region' updated successfully", result.out)
        self.assertNotIn("us-east-1", result.out)
        self.assertIn("(--name, --value, or --encrypted)", self.fails(2, "key", "update", "region").err)
        self.assertEqual(self.ok("key", "delete", "region", "--yes", "-j").json(),
                         {"message": "Key 'region' deleted successfully"})
        self.assertEqual(self.targets()[-1], "DELETE /api/v1/keys/region")


class WorkflowCommandTests(ResourceTestCase):
    def pack_files(self, action=None, workflow=None):
        """A pack tree with actions/deploy_service.yaml and its workflow file; the action path."""
        actions = os.path.join(self.tmp, "pack", "actions")
        os.makedirs(os.path.join(actions, "workflows"), exist_ok=True)
        path = os.path.join(actions, "deploy_service.yaml")
        with open(path, "w") as f:
            f.write(action if action is not None else
                    "# Deploy Service (a workflow action)\nref: examples.deploy_service\nlabel: Deploy Service\n"
                    "description: Roll out a service\nworkflow_file: workflows/deploy_service.workflow.yaml\n"
                    "enabled: true\nparameters:\n  hosts: {type: array, required: true}\n"
                    "output:\n  summary: {type: object}\ntags: [deploy, ops]\n")
        with open(os.path.join(actions, "workflows", "deploy_service.workflow.yaml"), "w") as f:
            f.write(workflow if workflow is not None else WORKFLOW_YAML)
        return path

    def test_upload_help_describes_the_workflow_file_field(self):
        text = " ".join(self.ok("workflow", "upload", "--help").out.split())
        for words in ("its workflow_file field names the workflow YAML", "relative to actions/",
                      "under actions/workflows/", "workflow_file: workflows/deploy.yaml"):
            self.assertIn(words, text)

    def test_upload_creates_then_needs_force_to_update(self):
        path = self.pack_files()
        out = self.ok("workflow", "upload", path).out
        self.assertEqual(out.split("\n\n")[0].splitlines(), [
            "ℹ Uploading workflow action 'examples.deploy_service' to pack 'examples'",
            "ℹ   Action YAML:   " + path,
            "ℹ   Workflow YAML: " + os.path.join(os.path.realpath(os.path.dirname(path)), "workflows",
                                                 "deploy_service.workflow.yaml")])
        self.assertIn("✓ Workflow 'examples.deploy_service' uploaded successfully\nReference:  examples.deploy_service\n"
                      "Pack:       examples\nLabel:      Deploy Service\nVersion:    2.1.0\nTags:       deploy, ops\n", out)
        sent = self.sent("POST", "/api/v1/packs/examples/workflow-files").json()
        definition = dict(WORKFLOW_DATA)  # the workflow's own parameters win over the action's
        self.assertEqual(sent, {"name": "deploy_service", "label": "Deploy Service", "version": "2.1.0",
                                "pack_ref": "examples", "definition": dict(definition, output={"summary": {
                                    "type": "object"}}),
                                "description": "Roll out a service", "enabled": True, "tags": ["deploy", "ops"],
                                "param_schema": {"hosts": {"type": "array", "required": True}},
                                "out_schema": {"summary": {"type": "object"}}})
        self.assertIn("Workflow 'examples.deploy_service' already exists. Use --force to update it.",
                      self.fails(1, "workflow", "upload", path).err)
        self.assertEqual(self.server.count("PUT"), 0)
        result = self.ok("workflow", "upload", path, "--force", "-j").json()
        self.assertEqual(result["ref"], "examples.deploy_service")
        self.assertEqual(self.sent("PUT", "/api/v1/workflows/examples.deploy_service/file").json(), sent)
        self.assertIn("ℹ Workflow already exists, updating...", self.ok("workflow", "upload", path, "-f").out)

    def test_upload_defaults_and_local_errors(self):
        path = self.pack_files(action="ref: examples.tiny\nworkflow_file: workflows/deploy_service.workflow.yaml\n",
                               workflow="tasks: []\n")
        self.ok("workflow", "upload", path)
        self.assertEqual(self.server.requests[-1].json(), {"name": "tiny", "label": "tiny", "version": "1.0.0",
                                                           "pack_ref": "examples", "definition": {"tasks": []}})
        self.assertIn("Pack 'nope' not found", self.fails(1, "workflow", "upload", self.pack_files(
            action="ref: nope.x\nworkflow_file: workflows/deploy_service.workflow.yaml\n")).err)
        missing = os.path.join(self.tmp, "missing.yaml")
        for files, message in (
                (missing, "Action YAML file not found: %r" % missing),
                (self.tmp, "Path is not a file: %r" % self.tmp),
                (("ref: examples.x\n", None), "Action YAML does not contain a 'workflow_file' field"),
                (("ref: x\nworkflow_file: workflows/a.yaml\n", None), "Invalid action ref 'x'"),
                (("ref: a.b.c\nworkflow_file: workflows/a.yaml\n", None), "Invalid action ref 'a.b.c'"),
                (("ref: examples.x\nworkflow_file: ../../outside.yaml\n", None),
                 "Workflow file must be relative to actions/ and located under actions/workflows/"),
                (("ref: examples.x\nworkflow_file: /etc/passwd\n", None), "Workflow file must be relative to actions/"),
                (("ref: examples.x\nworkflow_file: workflows\n", None), "Workflow file must be relative to actions/"),
                (("ref: examples.x\nworkflow_file: workflows/gone.yaml\n", None), "Workflow file not found: "),
                (("ref: examples.x\nworkflow_file: [\n", None), "Invalid action YAML: "),
                ((None, "tasks:\n\t- a\n"), "Invalid workflow YAML: "),
                (("- a\n", None), "is not a mapping")):
            with self.subTest(files=files):
                path = self.pack_files(*files) if isinstance(files, tuple) else files
                self.assertIn(message, self.fails(2, "workflow", "upload", path).err)
        elsewhere = os.path.join(self.tmp, "deploy.yaml")
        with open(elsewhere, "w") as f:
            f.write("ref: examples.x\nworkflow_file: workflows/a.yaml\n")
        self.assertIn("Action YAML must live directly inside a pack actions/ directory",
                      self.fails(2, "workflow", "upload", elsewhere).err)

    @unittest.skipUnless(POSIX, "symbolic links")
    def test_upload_refuses_a_workflows_link_that_leads_out(self):
        path = self.pack_files()
        workflows = os.path.join(os.path.dirname(path), "workflows")
        outside = os.path.join(self.tmp, "outside")
        shutil.move(workflows, outside)
        os.symlink(outside, workflows)
        self.assertIn("Workflow file resolves outside the actions/workflows directory",
                      self.fails(2, "workflow", "upload", path).err)
        self.assertEqual(self.server.count("POST"), 0)

    def test_list(self):
        self.assertEqual(self.lines("workflow", "list"), [
            "Reference        Pack      Label   Version  Tags",
            "───────────────  ────────  ──────  ───────  ──────────",
            "examples.deploy  examples  Deploy  1.2.0    ci, deploy", "ℹ 1 workflow(s) found"])
        self.ok("workflow", "list", "--pack", "examples", "--tags", "ci", "--search", "dep")
        self.assertEqual(self.targets()[-1], "GET /api/v1/workflows?pack_ref=examples&tags=ci&search=dep")
        self.assertEqual(self.ok("workflow", "list", "--tags", "nope").out, "ℹ No workflows found\n")

    def test_show(self):
        out = self.ok("workflow", "show", "examples.deploy").out
        self.assertIn("Tags:         ci, deploy", out)
        self.assertIn("\nParameters\n──────────\nenv:\n  type: string\n  default: staging\n", out)
        self.assertIn("1  build   core.echo  2 target(s)", out)
        self.assertIn("4  notify  core.echo  terminal", out)
        self.assertEqual(self.ok("workflow", "show", "examples.deploy", "-j").json()["version"], "1.2.0")

    def test_delete_accepts_any_2xx(self):
        self.server.fail("/api/v1/workflows/examples.deploy", method="DELETE", status=204)
        self.assertEqual(self.ok("workflow", "delete", "examples.deploy", "--yes").out,
                         "✓ Workflow 'examples.deploy' deleted successfully\n")
        self.assertEqual(self.ok("workflow", "delete", "examples.deploy", "--yes", "-j").json(),
                         {"message": "Workflow 'examples.deploy' deleted"})


class OutputFormTests(ResourceTestCase):
    def test_show_commands_print_the_api_object_in_json_and_yaml(self):
        server = self.server
        cases = ((("rule", "show", "examples.on_timer"), server.rules["examples.on_timer"]),
                 (("trigger", "show", "core.timer"), server.triggers["core.timer"]),
                 (("sensor", "show", "core.timer_sensor"), server.sensors["core.timer_sensor"]),
                 (("action", "show", "core.echo"), server.actions["core.echo"]),
                 (("workflow", "show", "examples.deploy"), server.workflows["examples.deploy"]))
        for argv, expected in cases:
            with self.subTest(argv):
                self.assertEqual(self.ok(*(argv + ("-j",))).json(), expected)
                self.assertEqual(self.ok(*(argv + ("-y",))).out, attune.to_yaml(expected) + "\n")

    def test_every_page_is_printed_as_it_comes_and_reads_as_the_whole_list(self):
        """--all lists are written an item at a time: the same text as the whole list's dump,
        in JSON and YAML, for every list that streams (packs, actions, rules, triggers,
        sensors, policies, keys), and page 1 is on stdout before page 2 is asked for."""
        rng = random.Random(261)
        for i in range(230):
            ref = "p%03d.%s" % (i, "".join(rng.choice("abcäö✓\u202e\x1b") for _ in range(3)))
            self.server.packs[ref] = self.server.new_pack(1000 + i, ref, "Pack %d" % i, description=None if i % 7
                                                          else "ünïcode ✓ %d" % i, tags=["t"] * (i % 3))
        for argv, collection in ((("pack", "list"), self.server.packs), (("trigger", "list"), self.server.triggers),
                                 (("rule", "list"), self.server.rules), (("action", "list"), self.server.actions)):
            expected = sorted(collection.values(), key=lambda item: item["id"])
            with self.subTest(argv):
                self.assertEqual(self.ok(*(argv + ("--all", "-j"))).out, attune.to_json(expected) + "\n")
                self.assertEqual(self.ok(*(argv + ("--all", "-y"))).out, attune.to_yaml(expected) + "\n")
        for fmt, empty in (("-j", "[]\n"), ("-y", "[]\n")):
            self.assertEqual(self.ok("pack", "list", "--all", "--name", "nothing-matches", fmt).out, empty)
        out, seen = io.StringIO(), []
        self.server.fail("/api/v1/packs", times=None, effect=lambda: seen.append(out.getvalue()))
        with contextlib.redirect_stdout(out):
            self.assertEqual(attune.main(["pack", "list", "--all", "-j"], environ=self.environ()), 0)
        self.assertEqual(len(seen), 3)  # 233 packs: three pages of 100
        self.assertEqual(seen[0], "")
        self.assertEqual(seen[1].count('"ref"'), 100)
        self.assertEqual(seen[2].count('"ref"'), 200)
        self.assertEqual(len(json.loads(out.getvalue())), 233)

    def test_streamed_json_falls_back_to_escapes_item_by_item(self):
        self.server.packs["core"]["description"] = "Zoë ✓ 🚀"
        out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
        with contextlib.redirect_stdout(out):
            self.assertEqual(attune.main(["pack", "list", "--all", "-j"], environ=self.environ()), 0)
        out.flush()
        text = out.buffer.getvalue().decode("latin-1")
        self.assertEqual(json.loads(text), sorted(self.server.packs.values(), key=lambda p: p["id"]))
        self.assertIn("\\u2713", text)

    def test_lists_print_arrays(self):
        for argv, collection in ((("rule", "list"), self.server.rules), (("trigger", "list"), self.server.triggers),
                                 (("sensor", "list"), self.server.sensors), (("action", "list"), self.server.actions)):
            with self.subTest(argv):
                self.assertEqual(self.ok(*(argv + ("-j",))).json(),
                                 sorted(collection.values(), key=lambda item: item["id"]))

    @unittest.skipUnless(POSIX, "pseudo-terminals")
    def test_waiting_shows_progress_on_a_terminal_stderr_only(self):
        import pty
        master, slave = pty.openpty()
        p = subprocess.Popen(attune_argv() + ["run", "core.echo", "--param", "message=hi", "-w"],
                             env=self.process_env(), stdin=subprocess.DEVNULL, stderr=slave,
                             stdout=subprocess.PIPE, universal_newlines=True)
        os.close(slave)
        out = p.communicate(timeout=60)[0]
        seen = read_terminal(master)
        self.assertEqual(p.returncode, 0)
        self.assertRegex(seen.decode(), r"\rExecution \d+: (requested|scheduled|running) \(\d+s\)")
        self.assertNotIn("Execution %d: " % max(self.server.executions), out)
        piped = self.run_cli("run", "core.echo", "--param", "message=hi", "-w")
        self.assertEqual(piped.err, "")


# A C locale that Python reads byte for byte: no UTF-8 mode, no locale coercion (3.7+);
# what Python 3.6 and PyPy do under LANG=C anyway. Non-ASCII input arrives as lone surrogates.
C_LOCALE = {"LANG": "C", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": None}


class LocaleTests(ResourceTestCase):
    """Bytes, not the locale: what the user types reaches the server as the UTF-8 text it is,
    under any locale; output never fails on any stream encoding; TERM=dumb and NO_COLOR get
    no cursor, screen or colour codes. Real processes: the locale is a process's."""
    NAME, PASSWORD = "jürgen", "Pässwörd ✓"

    def setUp(self):
        super().setUp()
        self.server.users[self.NAME] = {"id": 9, "password": self.PASSWORD, "display_name": "Jürgen Ünal"}

    def run_bytes(self, argv, env, stdin=b""):
        """attune.py in a process with bytes in and out (the test's own locale stays out of it);
        its output read in the encoding it was asked to write."""
        p = subprocess.Popen(attune_argv() + argv, env=self.process_env(env), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(stdin, timeout=60)
        encoding = env.get("PYTHONIOENCODING") or "utf-8"
        result = Result(p.returncode, out.decode(encoding), err.decode(encoding))
        self.assert_no_leak(result)
        self.assertNotIn("Traceback", result.err)
        return result

    def logins(self):
        return [r.json() for r in self.server.requests if r.path == "/auth/login"]

    def test_a_c_locale_sends_the_bytes_the_user_gave(self):
        login = ["auth", "login", "--url", self.server.url, "--save-profile", "j"]
        for name, argv, stdin, extra in (
                ("stdin", login + ["-u", self.NAME, "--password-stdin"], (self.PASSWORD + "\n").encode(), {}),
                ("environment", login + ["-u", self.NAME], b"", {"ATTUNE_PASSWORD": self.PASSWORD}),
                ("argv", login + ["-u", self.NAME, "--password", self.PASSWORD], b"", {}),
                ("stdin with CRLF", login + ["-u", self.NAME, "--password-stdin"],
                 (self.PASSWORD + "\r\n").encode(), {})):
            with self.subTest(name):
                env = dict(C_LOCALE, ATTUNE_PASSWORD=None)
                env.update(extra)
                result = self.run_bytes(argv, env, stdin)
                self.assertEqual(result.code, 0, result)
                self.assertEqual(self.logins()[-1], {"login": self.NAME, "password": self.PASSWORD})
        # a value, a name, a query and a path segment, each through the C locale
        secret = "geheim-Äöü-🔑"
        self.assertEqual(self.run_bytes(["key", "create", "--ref", "k1", "--name", "Schlüssel", "--value-stdin"],
                                        C_LOCALE, secret.encode() + b"\n").code, 0)
        self.assertEqual(self.sent("POST", "/api/v1/keys").json()["value"], secret)
        self.assertEqual(self.sent("POST", "/api/v1/keys").json()["name"], "Schlüssel")
        self.assertEqual(self.run_bytes(["key", "update", "k1", "--value", "wert-ß"], C_LOCALE).code, 0)
        self.assertEqual(self.sent("PUT", "/api/v1/keys/k1").json()["value"], "wert-ß")
        self.run_bytes(["pack", "show", "pâck"], C_LOCALE)
        self.assertIn("GET /api/v1/packs/p%C3%A2ck", self.targets())
        self.run_bytes(["api", "POST", "/echo", "--data", '{"grüß": "dich"}'], C_LOCALE)
        self.assertEqual([r.json() for r in self.server.requests if r.path == "/api/v1/echo"], [{"grüß": "dich"}])

    def test_input_that_is_not_utf8_is_refused(self):
        result = self.run_bytes(["auth", "login", "--url", self.server.url, "-u", "admin", "--password-stdin"],
                                {}, b"P\xe4ssword\n")
        self.assertEqual(result.code, 2, result)
        self.assertIn("standard input is not UTF-8 text", result.err)
        self.assertEqual(self.logins(), [])

    def test_output_never_fails_whatever_the_stream_encoding(self):
        rng = random.Random(26)
        alphabet = "äöüßÆØÅçñ€✓⚠…─•中文字🚀👩‍💻\u0301\u200b\ufeff" + "".join(CONTROL_SAMPLES)
        descriptions = hostile_strings(rng, alphabet, 12, 20)
        for i, text in enumerate(descriptions):
            self.server.packs["core"]["description"] = text
            self.server.packs["core"]["label"] = text[::-1]
            for env in (C_LOCALE, {"PYTHONIOENCODING": "latin-1"}, {"PYTHONIOENCODING": "ascii"},
                        {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": None}):
                for fmt in ((), ("-j",), ("-y",)):
                    with self.subTest(i=i, env=env, fmt=fmt):
                        result = self.run_bytes(["pack", "show", "core"] + list(fmt), env)
                        self.assertEqual(result.code, 0, result)
                        self.assertEqual(result.err, "")
                        self.assertEqual(raw_controls(result.out), [])
                        if fmt == ("-j",):
                            self.assertEqual(json.loads(result.out)["description"], text)

    @unittest.skipUnless(POSIX, "pseudo-terminals")
    def test_a_dumb_terminal_gets_no_cursor_or_screen_control(self):
        import pty
        for term, controlled in (("xterm-256color", True), ("dumb", False)):
            for extra in ({}, {"NO_COLOR": "1"}):
                with self.subTest(term=term, extra=extra):
                    self.execute("core.echo", "message=x")
                    master, slave = pty.openpty()
                    p = subprocess.Popen(attune_argv() + ["execution", "watch", "--timeout", "30"],
                                         env=self.process_env(dict(extra, TERM=term)), stdin=subprocess.DEVNULL,
                                         stdout=slave, stderr=slave)
                    os.close(slave)
                    screen = read_terminal(master)
                    self.assertEqual(p.wait(timeout=60), 0, screen)
                    self.assertIn(b"All watched executions are done", screen)
                    self.assertEqual(b"\x1b[2J" in screen, controlled, screen)
                    if not controlled:
                        self.assertNotIn(b"\x1b", screen)
                    self.assertIsNone(re.search(rb"\x1b\[[0-9;]*m", screen))  # never colour
                    master, slave = pty.openpty()
                    p = subprocess.Popen(attune_argv() + ["run", "core.echo", "--param", "message=hi", "-w"],
                                         env=self.process_env(dict(extra, TERM=term)), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=slave)
                    os.close(slave)
                    status = read_terminal(master)
                    self.assertEqual(p.wait(timeout=60), 0, status)
                    self.assertEqual(b"\rExecution " in status, controlled, status)

    def test_empty_secret_input_is_refused_and_nothing_is_sent(self):
        cases = [["key", "update", "region", "--value-stdin"],
                 ["key", "create", "--ref", "k2", "--name", "K", "--value-stdin"],
                 ["key", "update", "region", "--value", ""],
                 ["auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url],
                 ["auth", "token-login", "--token-stdin", "--url", self.server.url]]
        for argv in cases:
            for stdin in ("", "\n", "\r\n"):
                with self.subTest(argv=argv, stdin=stdin):
                    before = self.server.count()
                    result = self.fails(2, *argv, stdin=stdin)
                    self.assertRegex(result.err, r"empty|no (password|integration token) on standard input")
                    self.assertEqual(self.server.count(), before, self.targets()[before:])
                    self.assertNotIn("✓", result.out)


@slow
class InterpreterFlagTests(AttuneTestCase):
    """The interpreter flags people run attune.py under keep working: -OO (no docstrings: help
    never comes from them), -W error (a deprecation on 3.12 or 3.13 would end the run),
    PYTHONDEVMODE=1 (an unclosed socket or file would warn), -I -E -S (the installed
    launcher's isolation). Each command of a day's work, in a real process, exits as it
    should and says nothing on stderr it would not say anyway."""
    FLAGS = ((["-OO"], {}), (["-W", "error"], {}), ([], {"PYTHONDEVMODE": "1"}), (["-I", "-E", "-S"], {}),
             (["-X", "dev", "-W", "error"], {}))

    def commands(self):
        login = ["auth", "login", "--url", self.server.url, "-u", "admin", "--password-stdin"]
        return [(["--help"], 0), (["--version"], 0), (["pack", "list", "--help"], 0), (["help", "exit-codes"], 0),
                (login, 0), (["auth", "token"], 0), (["-j", "pack", "list", "--all"], 0),
                (["run", "core.echo", "--param", "message=hi", "-w"], 0), (["execution", "list"], 0),
                (["config", "set", "description", "x"], 0), (["auth", "status"], 0), (["auth", "doctor"], 0),
                (["__complete", "--", "run", "core."], 0), (["auth", "refresh"], 0), (["pack", "show", "nope"], 1),
                (["--api-url", "http://127.0.0.1:%d" % free_port(), "auth", "whoami"], 4), (["auth", "logout"], 0)]

    def test_every_flag_and_command(self):
        plain_help = None
        for flags, extra in self.FLAGS:
            for argv, code in self.commands():
                with self.subTest(flags=flags, extra=extra, argv=argv[:3]):
                    p = subprocess.Popen([sys.executable] + flags + [ATTUNE_PY] + argv,
                                         env=self.process_env(extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, universal_newlines=True)
                    out, err = p.communicate(PASSWORD + "\n", timeout=120)
                    self.assert_no_leak(Result(p.returncode, out, err), argv == ["auth", "token"])
                    self.assertEqual(p.returncode, code, err)
                    self.assertNotIn("Traceback", err)
                    self.assertNotIn("Warning", err)
                    if argv == ["--help"]:
                        plain_help = plain_help or out
                        self.assertEqual(out, plain_help)  # -OO drops docstrings, never a line of help
                        self.assertIn("pack", out)


class ConfirmationTests(ResourceTestCase):
    DESTRUCTIVE = (("pack", "uninstall", "linux"), ("action", "delete", "core.echo"),
                   ("rule", "delete", "linux.on_file"), ("trigger", "delete", "core.timer"),
                   ("key", "delete", "region"), ("workflow", "delete", "examples.deploy"),
                   ("execution", "cancel", "1"))

    def test_without_a_terminal_and_without_yes_exit_2(self):
        for argv in self.DESTRUCTIVE:
            with self.subTest(argv):
                for extra in ((), ("-j",)):
                    result = self.fails(2, *(argv + extra))
                    self.assertIn("add --yes", result.err)
        self.assertEqual(self.server.count(), 0)

    @unittest.skipUnless(POSIX, "pseudo-terminals")
    def test_on_a_terminal_it_asks(self):
        import pty
        for answer, deleted in ((b"n\n", False), (b"y\n", True)):
            master, slave = pty.openpty()
            p = subprocess.Popen(attune_argv() + ["rule", "delete", "linux.on_file"],
                                 env=self.process_env(), stdin=slave, stderr=slave, stdout=subprocess.PIPE,
                                 start_new_session=True, universal_newlines=True)
            os.close(slave)
            seen = b""
            while b"[y/N]" not in seen:
                seen += os.read(master, 1024)
            self.assertIn(b"Are you sure you want to delete rule 'linux.on_file'?", seen)
            os.write(master, answer)
            out = p.communicate(timeout=60)[0]
            os.close(master)
            self.assertEqual(p.returncode, 0)
            self.assertEqual("linux.on_file" not in self.server.rules, deleted)
            self.assertIn("deleted successfully" if deleted else "Deletion cancelled", out)


class ApiCommandTests(ResourceTestCase):
    def test_get_prints_the_body(self):
        out = self.ok("api", "GET", "/packs").out
        self.assertEqual(json.loads(out)["items"][0]["ref"], "core")
        self.assertTrue(out.startswith('{\n  "items": [\n'))
        self.ok("api", "get", "packs/core")
        self.ok("api", "GET", "/auth/me")
        self.ok("api", "GET", "/health")
        self.ok("api", "GET", "/api/v1/rules", "-F", "enabled=true")
        self.assertEqual(self.targets(), ["GET /api/v1/packs", "GET /api/v1/packs/core", "GET /auth/me",
                                          "GET /health", "GET /api/v1/rules?enabled=true"])
        self.assertTrue(self.ok("api", "GET", "/packs/core", "-y").out.startswith("data:\n  id: 1\n"))

    def test_fields_and_data_make_the_body(self):
        self.ok("api", "POST", "/packs", "-F", "ref=x1", "-F", "label=X", "-F", "version=1.0.0", "-F", "tags=[\"a\"]")
        self.assertEqual(self.server.requests[-1].json(), {"ref": "x1", "label": "X", "version": "1.0.0",
                                                          "tags": ["a"]})
        self.ok("api", "POST", "/packs", "--data", '{"ref": "x2", "label": "X", "version": "1"}')
        body_file = os.path.join(self.tmp, "body.json")
        with open(body_file, "w") as f:
            f.write('{"ref": "x3", "label": "X", "version": "1"}')
        self.ok("api", "POST", "/packs", "--data", "@" + body_file)
        self.ok("api", "POST", "/packs", "--data", "-", "-F", "label=Y",
                stdin='{"ref": "x4", "label": "X", "version": "1"}')
        self.assertEqual(self.server.packs["x4"]["label"], "Y")
        self.assertTrue(all(ref in self.server.packs for ref in ("x1", "x2", "x3")))
        self.fails(2, "api", "POST", "/packs", "--data", "@" + os.path.join(self.tmp, "missing.json"))

    def test_paginate(self):
        for i in range(130):
            self.server.packs["p%03d" % i] = self.server.new_pack(500 + i, "p%03d" % i, "P")
        items = self.ok("api", "GET", "/packs", "--paginate").json()
        self.assertEqual(len(items), 133)
        self.assertEqual(self.targets()[-1], "GET /api/v1/packs?page=2&page_size=100")
        for _ in range(3):
            self.server.new_execution(self.server.actions["core.echo"], {})
        self.assertEqual(len(self.ok("api", "GET", "/api/v1/executions", "--paginate").json()), 3)
        self.assertEqual(self.targets()[-1], "GET /api/v1/executions?page=1&per_page=100")

    def test_errors_print_the_body_and_exit_with_the_matching_code(self):
        result = self.run_cli("api", "GET", "/packs/nope")
        self.assertEqual(result.code, 1)
        self.assertTrue(result.err.startswith('{\n  "error": "Pack \'nope\' not found"'), result)
        self.assertIn("attune: error: HTTP 404 Not Found", result.err)
        self.assertEqual(result.out, "")
        self.server.fail("/api/v1/packs", status=503, times=None, body={"error": "down", "code": "X"})
        self.assertEqual(self.run_cli("api", "GET", "/packs").code, 6)
        self.server.fail("/api/v1/rules", status=401, times=2, body={"error": {"code": 401, "message": "nope"}})
        self.assertEqual(self.run_cli("api", "GET", "/rules").code, 4)

    def test_refresh_and_retry_work_as_everywhere(self):
        self.seed(access_left=-100)
        self.ok("api", "DELETE", "/packs/linux")
        self.assertEqual(self.targets(), ["POST /auth/refresh", "DELETE /api/v1/packs/linux"])


class HealthCommandTests(AttuneTestCase):
    def test_healthy(self):
        env = {"ATTUNE_API_URL": self.server.url}
        self.assertEqual(self.ok("health", env=env).out,
                         "✓ Server at %s is healthy (status: ok)\n" % self.server.url)
        self.assertEqual(self.ok("health", "-j", env=env).json(), {"status": "ok"})
        self.assertNotIn("Authorization", self.server.requests[0].headers)

    def test_unreachable_and_unhealthy(self):
        self.fails(5, "health", "--api-url", "http://127.0.0.1:%d" % free_port())
        self.server.fail("/health", status=503, times=None, body={"status": "error"})
        self.fails(6, "health", "--api-url", self.server.url)
        started = time.monotonic()
        result = self.fails(5, "health", "--api-url", self.server.url, "--wait", "1")
        self.assertIn("did not become healthy within 1s", result.err)
        self.assertLess(time.monotonic() - started, 60)  # a hang guard

    def test_wait_for_a_server_that_starts_late(self):
        port = free_port()
        late = FakeAttune()
        threading.Timer(2.5, late.start, args=(port,)).start()  # later than the GET retries
        self.addCleanup(late.stop)
        result = self.ok("health", "--api-url", "http://127.0.0.1:%d" % port, "--wait", "30")
        self.assertIn("waiting up to 30s", result.err)
        self.assertIn("is healthy", result.out)


# === Tests: bootstrap scripts ================================================

class LoginIfNeededTests(AttuneTestCase):
    def login(self, *extra, **kwargs):
        return self.run_cli("auth", "login", "--if-needed", "--url", self.server.url, *extra, **kwargs)

    def test_a_usable_session_needs_nothing_not_even_a_password(self):
        self.seed()
        result = self.login()
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.out.splitlines()[0], "✓ Already logged in as admin")
        self.assertEqual(self.server.count(), 0)
        data = self.login("-j").json()
        self.assertTrue(data["already_logged_in"])
        self.assertEqual(data["profile"], "default")

    def test_a_due_refresh_is_done_instead_of_a_login(self):
        self.seed(access_left=-100)
        self.assertEqual(self.login().code, 0)
        self.assertEqual(self.server.log(), ["POST /auth/refresh"])

    def test_logs_in_when_needed_and_only_once(self):
        env = {"ATTUNE_PASSWORD": PASSWORD}
        first = self.login("-u", "admin", env=env)
        self.assertIn("Successfully logged in as admin", first.out)
        second = self.login("-u", "admin", env=env)
        self.assertIn("Already logged in as admin", second.out)
        self.assertEqual(self.server.count("POST", "/auth/login"), 1)

    def test_an_expired_session_logs_in_again(self):
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", status=401, body={"error": "Invalid or expired refresh token",
                                                            "code": "UNAUTHORIZED"})
        result = self.login(env={"ATTUNE_PASSWORD": PASSWORD})
        self.assertEqual(result.code, 0, result)
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/settings", "POST /auth/login"])
        self.assertIsNone(self.profile()["invalidated_at"])

    def test_another_url_or_user_is_a_new_login(self):
        self.seed()
        self.assertEqual(self.run_cli("auth", "login", "--if-needed", "--url", self.server.url + "/",
                                      "-u", "zoe", "--password-stdin", stdin="zoe-pass").code, 0)
        self.assertEqual(self.server.count("POST", "/auth/login"), 1)
        self.assertEqual(self.profile()["username"], "zoe")
        self.assertEqual(self.run_cli("auth", "login", "--if-needed", "--url", "http://127.0.0.1:%d" % free_port(),
                                      env={"ATTUNE_PASSWORD": PASSWORD}).code, 5)


class WaitForServerTests(AttuneTestCase):
    def test_a_server_that_starts_late(self):
        port = free_port()
        p = self.spawn("--wait-for-server", "30", "auth", "login", "-u", "admin", "--password-stdin",
                       "--url", "http://127.0.0.1:%d" % port, stdin=subprocess.PIPE)
        late = FakeAttune(admin_password=PASSWORD)
        self.addCleanup(late.stop)
        p.stdin.write(PASSWORD + "\n")
        p.stdin.flush()
        first = p.stderr.readline()  # it has found nobody there and waits: now the server starts
        self.assertEqual(first, "attune: waiting up to 30s for http://127.0.0.1:%d to come up ...\n" % port)
        threading.Timer(0.5, late.start, args=(port,)).start()
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("Successfully logged in as admin", out)
        self.assertEqual(err, "")
        self.assertEqual(late.log()[:2], ["GET /health", "GET /auth/settings"])

    def test_the_deadline_exits_5(self):
        started = time.monotonic()
        result = self.fails(5, "--wait-for-server", "1", "health", "--api-url", "http://127.0.0.1:%d" % free_port())
        self.assertIn("did not become healthy within 1s", result.err)
        self.assertLess(time.monotonic() - started, 60)  # a hang guard
        self.fails(5, "auth", "whoami", "--wait-for-server", "0.5",
                   env={"ATTUNE_API_URL": "http://attune.invalid", "ATTUNE_API_TOKEN": self.server.mint("admin")})

    def test_a_failing_health_and_502_503_504_are_waited_out(self):
        self.seed()
        self.server.fail("/health", status=503, times=3, body={"status": "error"})
        self.server.fail("/auth/me", status=502, times=2, body="<html>bad gateway</html>")
        self.ok("--wait-for-server", "20", "auth", "whoami")
        self.assertEqual(self.server.log(), ["GET /health"] * 4 + ["GET /auth/me"] * 3)

    def test_a_post_is_sent_once_even_while_waiting(self):
        """--wait-for-server waits for /health; a POST answered 502-504 after that may have
        been done by the server behind the gateway, so it is not sent again."""
        for status in (502, 503, 504):
            for wait in ([], ["--wait-for-server", "20"]):
                with self.subTest(status=status, wait=wait):
                    self.server.requests.clear()
                    self.server.fail("/auth/login", status=status, times=None, body={"error": "busy", "code": "X"})
                    self.fails(6, *wait, "auth", "login", "-u", "admin", "--password-stdin", "--url",
                               self.server.url, stdin=PASSWORD)
                    self.assertEqual(self.server.count("POST", "/auth/login"), 1)
                    self.server.faults[:] = []


@unittest.skipUnless(POSIX, "exec and signals")
class AuthExecTests(AttuneTestCase):
    CHILD = ("import os, sys\n"
             "print(os.environ.get('ATTUNE_API_URL'))\n"
             "print(os.environ.get('ATTUNE_API_TOKEN'))\n"
             "print(' '.join(sys.argv[1:]))\n"
             "sys.exit(int(sys.argv[1]))\n")

    def test_the_child_gets_url_and_token_in_its_environment_only(self):
        token = self.seed()["auth_token"]
        before = self.snapshot()
        result = self.run_process("auth", "exec", "--", sys.executable, "-c", self.CHILD, "7", "x", secrets_ok=True)
        self.assertEqual(result.code, 7, result)
        self.assertEqual(result.out.splitlines(), [self.server.url, token, "7 x"])
        self.assertEqual(self.snapshot(), before)

    def test_min_ttl_refreshes_first(self):
        self.seed(access_left=3000)
        result = self.run_process("auth", "exec", "--min-ttl", "3500", "--", sys.executable, "-c", self.CHILD, "0",
                                  secrets_ok=True)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(self.server.log(), ["POST /auth/refresh"])
        self.assertEqual(result.out.splitlines()[1], self.profile()["auth_token"])

    def test_signals_reach_the_child(self):
        self.seed()
        child = ("import signal, sys, time\n"
                 "signal.signal(signal.SIGTERM, lambda *a: sys.exit(9))\n"
                 "print('ready', flush=True)\n"
                 "time.sleep(60)\n")
        p = self.spawn("auth", "exec", "--", sys.executable, "-c", child)
        self.assertEqual(p.stdout.readline().strip(), "ready")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        self.assertEqual(p.returncode, 9)

    def test_no_token_no_child(self):
        marker = os.path.join(self.tmp, "ran")
        result = self.run_process("auth", "exec", "--", "touch", marker, env={"ATTUNE_API_URL": self.server.url})
        self.assertEqual(result.code, 4, result)
        self.assertFalse(os.path.exists(marker))

    def test_usage_and_missing_commands(self):
        self.seed()
        self.assertEqual(self.run_process("auth", "exec").code, 2)
        self.assertEqual(self.run_process("auth", "exec", "--").code, 2)
        result = self.run_process("auth", "exec", "--", "no-such-command-xyz")
        self.assertEqual(result.code, 127, result)
        self.assertIn("command not found: no-such-command-xyz", result.err)
        plain = os.path.join(self.tmp, "plain.txt")
        with open(plain, "w") as f:
            f.write("x")
        self.assertEqual(self.run_process("auth", "exec", "--", plain).code, 126)

    def test_environment_tokens_pass_through_without_touching_disk(self):
        token = self.server.mint("admin")
        result = self.run_process("auth", "exec", "--", sys.executable, "-c", self.CHILD, "0",
                                  env={"ATTUNE_API_TOKEN": token, "ATTUNE_API_URL": self.server.url},
                                  secrets_ok=True)
        self.assertEqual(result.out.splitlines()[:2], [self.server.url, token])
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))


def become_nobody():
    """What setpriv --reuid=65534 --regid=65534 --clear-groups does: no group of root's is kept."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def run_unprivileged(test, argv, env):
    """Run attune.py where file permissions bind: as nobody (with the world-readable system
    python and a copy of attune.py in test.tmp) when the tests run as root."""
    script = os.path.join(test.tmp, "attune.py")
    if not os.path.exists(script):
        shutil.copy(ATTUNE_PY, script)
    os.chmod(test.tmp, 0o755)
    python = "/usr/bin/python3" if IS_ROOT else sys.executable
    if not os.path.exists(python):
        test.skipTest("needs /usr/bin/python3 to run as nobody")
    p = subprocess.Popen([python, script] + list(argv), env=env, preexec_fn=become_nobody if IS_ROOT else None,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = p.communicate(timeout=60)
    result = Result(p.returncode, out, err)
    test.assert_no_leak(result)
    return result


def give_to_nobody(*paths):
    """Hand paths to the unprivileged user of run_unprivileged (only needed as root)."""
    if IS_ROOT:
        for path in paths:
            os.chown(path, 65534, 65534)


class HomeDirectoryTests(AttuneTestCase):
    def env_token(self, home, **extra):
        env = {"HOME": home, "ATTUNE_CONFIG": None, "ATTUNE_API_URL": self.server.url,
               "ATTUNE_API_TOKEN": self.server.mint("admin")}
        env.update(extra)
        return env

    def test_a_missing_home_works_with_an_environment_token(self):
        home = os.path.join(self.tmp, "no", "such", "home")
        for argv in (("auth", "whoami"), ("pack", "list"), ("auth", "status"), ("config", "list")):
            self.ok(*argv, env=self.env_token(home))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "no")))

    def test_a_home_that_is_not_a_directory(self):
        env = self.env_token("/dev/null")
        self.ok("auth", "whoami", env=env)
        self.ok("auth", "token", env=env, secrets_ok=True)
        result = self.fails(3, "config", "set", "description", "x", env=env)
        self.assertIn("cannot write credential file /dev/null/.config/attune/credentials.json", result.err)
        self.assertIn("--config FILE or ATTUNE_CONFIG", result.err)

    @unittest.skipUnless(POSIX, "permissions")
    def test_a_read_only_home(self):
        home = os.path.join(self.tmp, "ro-home")
        os.makedirs(home)
        if not IS_ROOT:
            os.chmod(home, 0o555)
            self.addCleanup(os.chmod, home, 0o755)
        env = self.process_env(self.env_token(home))

        def run(*argv):
            return run_unprivileged(self, argv, env)

        whoami = run("auth", "whoami")
        self.assertEqual(whoami.code, 0, whoami)
        refused = run("config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertEqual(refused.code, 3, refused)
        self.assertIn("cannot write credential file %s/.config/attune/credentials.json: Permission denied"
                      % home, refused.err)
        self.assertEqual(os.listdir(home), [])


def can_unshare_mounts():
    """True when this process may make a private mount namespace (root, a kernel that allows it)."""
    if not (IS_ROOT and shutil.which("unshare") and shutil.which("mount")):
        return False
    return subprocess.call(["unshare", "-m", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def in_mount_namespace(test, mounts, argv, env, input=None):
    """Run argv in a private mount namespace where each (source, target, read_only) of mounts
    is bind-mounted first: the container's view of a single file or a secret volume, made
    with `unshare -m` and gone when the process ends."""
    steps = []
    for source, target, read_only in mounts:
        steps.append("mount --bind %s %s" % (shlex.quote(source), shlex.quote(target)))
        if read_only:
            steps.append("mount -o remount,ro,bind %s" % shlex.quote(target))
    steps.append("exec " + " ".join(shlex.quote(a) for a in argv))
    p = subprocess.Popen(["unshare", "-m", "sh", "-c", " && ".join(steps)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = p.communicate(input, timeout=60)
    result = Result(p.returncode, out, err)
    test.assert_no_leak(result)
    return result


@unittest.skipUnless(POSIX, "owners, modes, links and mounts")
class WhereItLivesTests(AttuneTestCase):
    """The credential file where users put it: a symlink into a dotfiles checkout, another
    user's file rewritten under sudo, a read-only mount, a file bind-mounted on its own, a
    home that is missing or not writable. Nothing is spent (no refresh, no login) when its
    result could not be stored."""

    def refreshes(self):
        return self.server.count("POST", "/auth/refresh")

    def stow(self):
        """The credential file as GNU stow lays it out: the real file in ~/dotfiles, a relative
        link at ~/.config/attune/credentials.json; the real file's path."""
        real = os.path.join(self.tmp, "home", "dotfiles", "attune", ".config", "attune", "credentials.json")
        os.makedirs(os.path.dirname(real))
        os.makedirs(os.path.dirname(self.config))
        self.seed(access_left=-100)
        os.replace(self.config, real)
        os.symlink(os.path.relpath(real, os.path.dirname(self.config)), self.config)
        return real

    def test_a_link_the_user_owns_is_written_through_and_stays_a_link(self):
        real = self.stow()
        old = self.profile()["auth_token"]
        self.ok("auth", "whoami")  # expired: refreshed, and stored through the link
        self.assertEqual(self.refreshes(), 1)
        self.assertTrue(os.path.islink(self.config))
        self.assertNotEqual(self.profile()["auth_token"], old)
        with open(real) as f:
            self.assertEqual(json.load(f)["profiles"]["default"]["auth_token"], self.profile()["auth_token"])
        self.assertEqual(stat.S_IMODE(os.stat(real).st_mode), 0o600)
        self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url, stdin=PASSWORD)
        self.ok("config", "set", "description", "through the link")
        self.assertTrue(os.path.islink(self.config))
        self.assertEqual(self.profile()["description"], "through the link")
        for directory in (os.path.dirname(real), os.path.dirname(self.config)):  # no temp file left
            self.assertEqual([n for n in os.listdir(directory) if n.endswith(".tmp")], [])
        self.assertFalse(os.path.islink(self.config + ".lock"))

    def test_a_dangling_link_spends_nothing(self):
        os.makedirs(os.path.dirname(self.config))
        os.symlink(os.path.join(self.tmp, "gone", "creds.json"), self.config)
        result = self.fails(3, "auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                            stdin=PASSWORD)
        self.assertIn("which does not exist", result.err)
        self.assertIn("--config FILE or ATTUNE_CONFIG", result.err)
        self.assertEqual(self.server.count("POST", "/auth/login"), 0)
        self.assertTrue(os.path.islink(self.config))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "gone")))

    @unittest.skipUnless(IS_ROOT, "root with another user's link")
    def test_root_never_follows_another_users_link(self):
        real = self.stow()
        for owned in ("link", "target"):
            with self.subTest(owned=owned):
                os.lchown(self.config, 65534 if owned == "link" else 0, 65534 if owned == "link" else 0)
                os.chown(real, 65534 if owned == "target" else 0, 0)
                with open(real, "rb") as f:
                    before = f.read()
                result = self.fails(3, "auth", "whoami")
                self.assertIn("owned by uid 65534, not by you (uid 0)", result.err)
                self.assertIn("--config FILE or ATTUNE_CONFIG", result.err)
                self.assertEqual(self.refreshes(), 0)
                with open(real, "rb") as f:
                    self.assertEqual(f.read(), before)
                self.assertTrue(os.path.islink(self.config))

    @unittest.skipUnless(IS_ROOT, "sudo: root with the user's HOME")
    def test_root_keeps_the_owner_group_and_mode_of_the_users_file_and_lock(self):
        self.seed(access_left=-100)
        directory = os.path.dirname(self.config)
        for path in (self.env["HOME"], os.path.dirname(directory)):
            os.chmod(path, 0o755)
        for path in (directory, self.config):
            os.chown(path, 65534, 65534)
        os.chmod(self.config, 0o640)
        self.ok("auth", "whoami")  # as root: refreshed and stored
        self.assertEqual(self.refreshes(), 1)
        for path, mode in ((self.config, 0o640), (self.config + ".lock", 0o600)):
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (65534, 65534, mode), path)
        # the user's own next command still works, and can refresh again
        doc = self.read_doc()
        doc["profiles"]["default"]["auth_token_expires_at"] = int(time.time()) - 10
        with open(self.config, "w") as f:
            json.dump(doc, f)
        result = run_unprivileged(self, ["auth", "whoami"], self.process_env())
        self.assertEqual(result.code, 0, result)
        self.assertEqual(self.refreshes(), 2)
        self.assertEqual(os.stat(self.config).st_uid, 65534)

    @unittest.skipUnless(IS_ROOT, "sudo into a home that has no credential directory yet")
    def test_root_creates_the_users_directories_as_the_users(self):
        home = self.env["HOME"]
        os.makedirs(home)
        os.chown(home, 65534, 65534)
        self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url, stdin=PASSWORD,
                env={"ATTUNE_CONFIG": None})
        for path in (os.path.join(home, ".config"), os.path.dirname(self.config), self.config, self.config + ".lock"):
            self.assertEqual(os.stat(path).st_uid, 65534, path)
        result = run_unprivileged(self, ["auth", "whoami"], self.process_env({"ATTUNE_CONFIG": None}))
        self.assertEqual(result.code, 0, result)

    def test_another_users_file_is_read_but_no_refresh_is_spent(self):
        self.seed(access_left=-100)
        directory = os.path.dirname(self.config)
        for path in (self.env["HOME"], os.path.dirname(directory), directory):
            os.chmod(path, 0o755)
        os.chmod(self.config, 0o644)  # root's (or the test user's) file, readable by all
        env = self.process_env()
        before = self.snapshot()[0]
        if IS_ROOT:
            result = run_unprivileged(self, ["auth", "whoami"], env)
            self.assertIn("owned by uid 0, not by you (uid 65534)", result.err)
        else:
            os.chmod(self.config, 0o444)
            os.chmod(directory, 0o555)
            self.addCleanup(os.chmod, directory, 0o700)
            result = run_unprivileged(self, ["auth", "whoami"], env)
        self.assertEqual(result.code, 3, result)
        self.assertIn("cannot write credential file %s" % self.config, result.err)
        self.assertIn("ATTUNE_API_TOKEN", result.err)
        self.assertEqual(self.refreshes(), 0)  # a refresh that could not be stored is never sent
        self.assertEqual(self.snapshot()[0], before)

    def test_a_valid_token_due_for_refresh_is_used_when_the_file_cannot_be_written(self):
        self.seed(access_left=100)  # inside the refresh margin, still valid
        with mock.patch.object(attune.CredentialStore, "check_writable",
                               side_effect=attune.ConfigError("cannot write credential file: read-only")):
            result = self.ok("-v", "auth", "whoami")
        self.assertIn("read-only", result.err)
        self.assertEqual(self.refreshes(), 0)

    @unittest.skipUnless(can_unshare_mounts(), "needs root and unshare -m")
    def test_a_read_only_mount_spends_nothing(self):
        self.seed(access_left=-100)
        directory = os.path.dirname(self.config)
        before = self.snapshot()[0]
        result = in_mount_namespace(self, [(directory, directory, True)], attune_argv() + ["auth", "whoami"],
                                    self.process_env())
        self.assertEqual(result.code, 3, result)
        self.assertIn("it is read-only", result.err)
        self.assertEqual(self.refreshes(), 0)
        self.assertEqual(self.snapshot()[0], before)

    @unittest.skipUnless(can_unshare_mounts(), "needs root and unshare -m")
    def test_auth_doctor_says_when_the_file_cannot_be_written(self):
        self.seed()
        directory = os.path.dirname(self.config)
        result = in_mount_namespace(self, [(directory, directory, True)], attune_argv() + ["auth", "doctor", "-j"],
                                    self.process_env())
        report = json.loads(result.out)
        self.assertEqual(result.code, 3, result)  # what a refresh of this session would meet
        self.assertFalse(report["credential_file"]["writable"])
        self.assertIn("it is read-only", " ".join(report["problems"]))
        self.assertTrue(json.loads(self.ok("auth", "doctor", "-j").out)["credential_file"]["writable"])
        env = self.process_env({"ATTUNE_API_TOKEN": self.server.mint("admin"), "ATTUNE_API_URL": self.server.url})
        result = in_mount_namespace(self, [(directory, directory, True)], attune_argv() + ["auth", "doctor", "-j"],
                                    env)
        self.assertEqual(result.code, 0, result)  # a token from the environment needs no file written
        self.assertIn("it is read-only", " ".join(json.loads(result.out)["notes"]))

    def test_auth_doctor_finds_a_read_only_directory_as_the_next_login_would(self):
        """As another user, in their own credential directory made read-only (mode 555): no
        file can be made there, and doctor says so (exit 3) as the login after it does. A file
        already there is the user's to write: it is rewritten in place, and doctor agrees."""
        self.seed()
        directory = os.path.dirname(self.config)
        for path in (self.env["HOME"], os.path.dirname(directory)):
            os.chmod(path, 0o755)
        give_to_nobody(directory, self.config)
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o700)
        env = self.process_env({"ATTUNE_PASSWORD": PASSWORD})
        for exists in (True, False):
            with self.subTest(file_exists=exists):
                if not exists:
                    os.chmod(directory, 0o755)
                    os.remove(self.config)
                    os.chmod(directory, 0o555)
                result = run_unprivileged(self, ["auth", "doctor", "-j"], env)
                self.assertEqual(result.code, 0 if exists else 3, result)
                report = json.loads(result.out)
                self.assertEqual(report["credential_file"]["writable"], exists)
                if exists:
                    before = self.profile()["auth_token"]
                    login = run_unprivileged(self, ["auth", "login", "-u", "admin", "--url", self.server.url], env)
                    self.assertEqual(report["problems"], [])
                    self.assertEqual(login.code, 0, login)
                    self.assertNotEqual(self.profile()["auth_token"], before)  # stored, in place
                    continue
                table = run_unprivileged(self, ["auth", "doctor"], env)
                login = run_unprivileged(self, ["auth", "login", "-u", "admin", "--url", self.server.url], env)
                self.assertIn("%s is not writable" % directory, " ".join(report["problems"]))
                self.assertNotIn("no problems found", table.out + table.err)
                self.assertEqual(login.code, 3, login)
                self.assertIn("not writable", login.err)

    @unittest.skipUnless(can_unshare_mounts(), "needs root and unshare -m")
    def test_a_file_bind_mounted_on_its_own_is_rewritten_in_place(self):
        self.seed(access_left=-100)
        outside = os.path.join(self.tmp, "creds.json")  # docker run -v $PWD/creds.json:...
        shutil.copy(self.config, outside)
        old = self.profile()["auth_token"]
        result = in_mount_namespace(self, [(outside, self.config, False)],
                                    attune_argv() + ["-v", "auth", "whoami"], self.process_env())
        self.assertEqual(result.code, 0, result)
        self.assertIn("rewriting it in place", result.err)
        self.assertEqual(self.refreshes(), 1)
        with open(outside) as f:
            stored = json.load(f)["profiles"]["default"]
        self.assertNotEqual(stored["auth_token"], old)
        self.assertEqual([n for n in os.listdir(os.path.dirname(self.config)) if n.endswith(".tmp")], [])

    def mounted_into_a_root_directory(self):
        """docker run --user 65534 -v $PWD/creds.json:~/.config/attune/credentials.json: the
        file is the user's, the directory Docker made for the mount point is root's (0755).
        The outside file (the user's, holding a session whose access token has expired)."""
        self.seed(access_left=-100)
        outside = os.path.join(self.tmp, "outside", "creds.json")
        os.makedirs(os.path.dirname(outside))
        shutil.move(self.config, outside)
        give_to_nobody(os.path.dirname(outside), outside)
        open(self.config, "w").close()  # the mount point, root's
        for directory in (self.tmp, os.path.join(self.tmp, "home"), os.path.dirname(os.path.dirname(self.config)),
                          os.path.dirname(self.config)):
            os.chmod(directory, 0o755)
        script = os.path.join(self.tmp, "attune.py")
        shutil.copy(ATTUNE_PY, script)
        return outside, script

    @unittest.skipUnless(can_unshare_mounts() and shutil.which("setpriv") and os.path.exists("/usr/bin/python3"),
                         "needs root, unshare -m, setpriv and /usr/bin/python3")
    def test_a_file_mounted_into_a_directory_not_the_users_is_rewritten_in_place_under_its_own_lock(self):
        self.server.refresh_mode = "single-use"  # a second refresh with the same token would fail
        outside, script = self.mounted_into_a_root_directory()
        old = self.profile_of(outside)["auth_token"]
        runs = 6  # at once, each finding the token expired: one refresh, the others wait for the lock
        one = "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 %s -v auth whoami" % script
        shell = ('pids=""; for i in %s; do %s >/dev/null 2>>%s/err.$i & pids="$pids $!"; done; failed=0; '
                 'for p in $pids; do wait $p || failed=$((failed+1)); done; echo "failed=$failed"'
                 % (" ".join(str(i) for i in range(runs)), one, self.tmp))
        result = in_mount_namespace(self, [(outside, self.config, False)], ["sh", "-c", shell],
                                    self.process_env({"HOME": os.path.join(self.tmp, "home")}))
        errors = ""
        for i in range(runs):
            with open(os.path.join(self.tmp, "err.%d" % i)) as f:
                errors += f.read()
        self.assertEqual((result.code, result.out.strip()), (0, "failed=0"), errors)
        self.assertEqual(self.refreshes(), 1, errors)
        self.assertIn("locking %s itself" % self.config, errors)
        self.assertIn("(its directory is not writable); rewriting it in place", errors)
        stored = self.profile_of(outside)
        self.assertNotEqual(stored["auth_token"], old)
        self.assertEqual(os.listdir(os.path.dirname(self.config)), ["credentials.json"])  # no lock, no temp file
        self.assertEqual(os.stat(outside).st_uid, 65534)  # still the user's

    def profile_of(self, path):
        with open(path) as f:
            return json.load(f)["profiles"]["default"]

    @unittest.skipUnless(IS_ROOT, "a directory another user may not write")
    def test_a_writable_file_in_a_directory_not_the_users_is_rewritten_in_place(self):
        self.seed(access_left=-100)
        give_to_nobody(self.config)
        for directory in (self.tmp, os.path.join(self.tmp, "home"), os.path.dirname(os.path.dirname(self.config)),
                          os.path.dirname(self.config)):
            os.chmod(directory, 0o755)
        env = self.process_env()
        old, inode = self.profile()["auth_token"], os.stat(self.config).st_ino
        whoami = run_unprivileged(self, ["auth", "whoami"], env)
        self.assertEqual(whoami.code, 0, whoami)
        self.assertEqual(self.refreshes(), 1)
        self.assertNotEqual(self.profile()["auth_token"], old)
        changed = run_unprivileged(self, ["config", "set", "description", "in place"], env)
        self.assertEqual(changed.code, 0, changed)
        self.assertEqual(self.profile()["description"], "in place")
        self.assertEqual(os.stat(self.config).st_ino, inode)  # the same file, rewritten
        doctor = run_unprivileged(self, ["-j", "auth", "doctor"], env)
        report = json.loads(doctor.out)
        self.assertEqual(report["problems"], [], doctor)
        self.assertEqual(report["lock"]["path"], self.config)  # no lock file can be made: the file itself
        self.assertIn("works", report["lock"]["status"])
        self.assertEqual(os.listdir(os.path.dirname(self.config)), ["credentials.json"])

    def test_a_rename_refused_with_ebusy_falls_back_to_an_in_place_write(self):
        self.seed(access_left=-100)
        inode = os.stat(self.config).st_ino

        def busy(src, dst):
            raise OSError(errno.EBUSY, "Device or resource busy")

        with mock.patch("os.replace", busy):
            self.ok("auth", "whoami")
        self.assertEqual(os.stat(self.config).st_ino, inode)  # the same file, rewritten
        self.assertEqual(self.profile()["invalidated_at"], None)
        self.assertEqual(self.refreshes(), 1)
        self.ok("auth", "whoami")  # and it parses
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.config))),
                         ["credentials.json", "credentials.json.lock"])

    def test_nothing_is_created_outside_an_existing_home(self):
        for home in (os.path.join(self.tmp, "nonexistent"), "/dev/null"):
            with self.subTest(home=home):
                env = {"HOME": home, "ATTUNE_CONFIG": None, "XDG_CONFIG_HOME": None}
                self.ok("config", "list", env=env)  # reads see no file
                result = self.fails(3, "config", "set", "description", "x", env=env)
                for name in ("--config", "ATTUNE_CONFIG", "ATTUNE_API_TOKEN"):
                    self.assertIn(name, result.err)
                result = self.fails(3, "auth", "login", "-u", "admin", "--password-stdin", "--url",
                                    self.server.url, stdin=PASSWORD, env=env)
                self.assertEqual(self.server.count("POST", "/auth/login"), 0)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "nonexistent")))
        # not logged in there: the advice is what can work there, not `auth login`
        result = self.fails(4, "pack", "list", env={"HOME": os.path.join(self.tmp, "nonexistent"),
                                                    "ATTUNE_CONFIG": None, "XDG_CONFIG_HOME": None,
                                                    "ATTUNE_API_URL": self.server.url})
        self.assertIn("no session can be stored here (the home directory %s does not exist); give a token in "
                      "ATTUNE_API_TOKEN or ATTUNE_TOKEN_FILE" % os.path.join(self.tmp, "nonexistent"), result.err)
        with mock.patch("os.path.expanduser", lambda path: path):  # no HOME, no password entry
            result = self.fails(4, "pack", "list", env={"HOME": None, "ATTUNE_CONFIG": None,
                                                        "XDG_CONFIG_HOME": None, "ATTUNE_API_URL": self.server.url})
        self.assertIn("no session can be stored here (HOME is not set)", result.err)
        self.assertEqual(self.server.log(), ["GET /api/v1/packs"] * 2)  # asked without a token, answered 401
        xdg = os.path.join(self.tmp, "no-xdg", ".config")
        self.fails(3, "config", "set", "description", "x", env={"ATTUNE_CONFIG": None, "XDG_CONFIG_HOME": xdg})
        self.assertFalse(os.path.exists(os.path.dirname(xdg)))

    @unittest.skipUnless(IS_ROOT and os.path.exists("/usr/bin/python3"), "a service user whose home is /")
    def test_a_home_the_user_cannot_write(self):
        env = self.process_env({"HOME": "/", "ATTUNE_CONFIG": None, "XDG_CONFIG_HOME": None})
        result = run_unprivileged(self, ["config", "set", "description", "x"], env)
        self.assertEqual(result.code, 3, result)
        self.assertIn("ATTUNE_API_TOKEN", result.err)
        self.assertFalse(os.path.exists("/.config/attune"))

    def test_paths_are_stored_absolute(self):
        os.makedirs(os.path.join(self.tmp, "certs"))
        cwd = os.getcwd()
        os.chdir(os.path.join(self.tmp, "certs"))
        self.addCleanup(os.chdir, cwd)
        self.ok("config", "add-profile", "lab", "--api-url", "https://lab.invalid", "--ca-bundle", "lab.pem")
        self.ok("config", "set", "ca_bundle", "ca.pem")
        self.ok("config", "set", "ca_bundle", "~/ca.pem")
        doc = self.read_doc()["profiles"]
        self.assertEqual(doc["lab"]["ca_bundle"], os.path.join(self.tmp, "certs", "lab.pem"))
        self.assertEqual(doc["default"]["ca_bundle"], os.path.join(self.env["HOME"], "ca.pem"))


class DoctorTests(AttuneTestCase):
    def doctor(self, *extra, **kwargs):
        result = self.run_cli("auth", "doctor", "-j", *extra, **kwargs)
        self.assertNotIn("Traceback", result.err)
        return result, json.loads(result.out)

    def test_all_well(self):
        self.seed()
        before = self.snapshot()
        result, report = self.doctor()
        self.assertEqual(result.code, 0, result)
        self.assertEqual((report["profile"]["name"], report["profile"]["source"], report["profile"]["api_url_source"]),
                         ("default", "file", "file"))
        self.assertEqual((report["credential_file"]["mode"], report["credential_file"]["parses"]), ("600", True))
        self.assertEqual(report["lock"]["status"], "works: another process was refused while it was held")
        self.assertTrue(report["server"]["reachable"])
        self.assertLessEqual(abs(report["server"]["clock_skew_seconds"]), 2)
        self.assertTrue(report["token"]["usable"])
        self.assertEqual(report["token"]["issued_at"], attune.jwt_claims(self.profile()["auth_token"])["iat"])
        self.assertEqual(report["problems"], [])
        self.assertEqual(self.snapshot()[0], before[0])
        table = self.ok("auth", "doctor").out
        for heading in ("Profile", "Credential file", "Lock", "Network", "Server", "Token", "Summary"):
            self.assertIn("\n%s\n%s\n" % (heading, "─" * len(heading)), "\n" + table)
        self.assertIn("✓ no problems found", table)

    def test_unreachable_server_exits_5_and_reports_the_rest(self):
        self.seed(api_url="http://127.0.0.1:%d" % free_port())
        result, report = self.doctor()
        self.assertEqual(result.code, 5, result)
        self.assertFalse(report["server"]["reachable"])
        self.assertIn("connection refused", report["server"]["error"])
        self.assertTrue(report["token"]["usable"])

    def test_corrupt_file_and_repair(self):
        os.makedirs(os.path.dirname(self.config))
        with open(self.config, "w") as f:
            f.write('{"profiles": ')
        os.chmod(self.config, 0o600)
        env = {"ATTUNE_API_URL": self.server.url}
        result, report = self.doctor(env=env)
        self.assertEqual(result.code, 3, result)
        self.assertFalse(report["credential_file"]["parses"])
        self.assertIn("run: attune auth doctor --repair", " ".join(report["problems"]))
        result, report = self.doctor("--repair", env=env)
        self.assertEqual(result.code, 0, result)
        aside = report["credential_file"]["moved_aside_to"]
        self.assertRegex(aside, re.escape(self.config) + r"\.corrupt-\d{8}T\d{6}Z$")
        with open(aside) as f:
            self.assertEqual(f.read(), '{"profiles": ')
        self.assertEqual(self.read_doc(), {"version": 1, "profiles": {}})
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)

    @unittest.skipUnless(POSIX, "symbolic links")
    def test_repair_through_a_dotfiles_link_keeps_the_link(self):
        real = os.path.join(self.tmp, "dotfiles", "attune", "credentials.json")
        os.makedirs(os.path.dirname(real))
        os.makedirs(os.path.dirname(self.config))
        with open(real, "w") as f:
            f.write('{"profiles": ')
        os.chmod(real, 0o600)
        os.symlink(os.path.relpath(real, os.path.dirname(self.config)), self.config)
        result, report = self.doctor("--repair", env={"ATTUNE_API_URL": self.server.url})
        self.assertEqual(result.code, 0, result)
        aside = report["credential_file"]["moved_aside_to"]
        self.assertRegex(aside, re.escape(os.path.realpath(real)) + r"\.corrupt-\d{8}T\d{6}Z$")  # beside it
        with open(aside) as f:
            self.assertEqual(f.read(), '{"profiles": ')
        self.assertTrue(os.path.islink(self.config))
        self.assertEqual(self.read_doc(), {"version": 1, "profiles": {}})
        self.assertEqual(stat.S_IMODE(os.stat(real).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.config))), ["credentials.json",
                                                                            "credentials.json.lock"])

    @unittest.skipUnless(IS_ROOT, "a directory another user may not write")
    def test_repair_where_no_copy_can_be_kept_changes_nothing(self):
        directory = os.path.dirname(self.config)
        os.makedirs(directory)
        with open(self.config, "w") as f:
            f.write('{"profiles": ')
        os.chmod(self.config, 0o600)
        give_to_nobody(self.config)
        for path in (self.tmp, self.env["HOME"], os.path.dirname(directory), directory):
            os.chmod(path, 0o755)
        result = run_unprivileged(self, ["auth", "doctor", "--repair"], self.process_env())
        self.assertEqual(result.code, 3, result)
        self.assertIn("cannot keep a copy of the corrupt credential file as %s.corrupt-" % self.config, result.err)
        self.assertIn("move it aside yourself", result.err)
        with open(self.config) as f:
            self.assertEqual(f.read(), '{"profiles": ')
        self.assertEqual(os.listdir(directory), ["credentials.json"])

    def test_open_permissions_and_repair(self):
        self.seed()
        os.chmod(self.config, 0o644)
        result, report = self.doctor()
        self.assertEqual(result.code, 3)
        self.assertIn("run: chmod 600 %s" % self.config, report["problems"][0])
        result, report = self.doctor("--repair")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)

    def test_clock_skew_proxy_and_ca_bundle(self):
        self.seed()
        self.server.clock_offset = -300
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        env = {"HTTP_PROXY": "http://user:proxy-pass@proxy.invalid:3128", "NO_PROXY": "127.0.0.1,10.0.0.0/8",
               "ATTUNE_CA_BUNDLE": ca}
        self.extra_secrets = {"proxy-pass"}
        result, report = self.doctor(env=env)
        self.assertEqual(result.code, 0, result)
        self.assertAlmostEqual(report["server"]["clock_skew_seconds"], -300, delta=3)
        # The Date header counts whole seconds, so the note may be a second either side of 5m.
        expected = ("differ by 4m 59s", "differ by 5m;", "differ by 5m 1s")
        self.assertTrue(any(e in note for note in report["notes"] for e in expected), report["notes"])
        self.assertEqual(report["network"]["proxy"], None)  # loopback is never proxied
        self.assertEqual((report["network"]["ca_bundle"], report["network"]["ca_bundle_source"]), (ca, "env"))
        self.seed(api_url="http://attune.invalid")
        result, report = self.doctor(env=env)
        self.assertEqual(report["network"]["proxy"], "http://user:***@proxy.invalid:3128")
        self.assertEqual(report["network"]["no_proxy"], "127.0.0.1,10.0.0.0/8")
        self.assertEqual(result.code, 5)

    @unittest.skipUnless(POSIX, "fcntl")
    def test_a_lock_that_keeps_nobody_out_is_a_problem(self):
        self.seed()

        class FakeFlock:  # "succeeds" without locking anything, like a broken network file system
            LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

            @staticmethod
            def flock(fd, op):
                pass

            lockf = flock

        with mock.patch.object(attune, "fcntl", FakeFlock):
            result, report = self.doctor()
        self.assertEqual(result.code, 3, result)
        self.assertIn("does not keep other processes out", report["problems"][0])

    def test_not_logged_in_is_a_note(self):
        result, report = self.doctor(env={"ATTUNE_API_URL": self.server.url})
        self.assertEqual(result.code, 0, result)
        self.assertIn("not logged in; run: attune auth login", report["notes"])
        self.assertIn("no credential file yet", " ".join(report["notes"]))
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))


class CompletionTests(AttuneTestCase):
    def script(self, shell):
        return self.ok("completion", shell).out

    def complete_in_bash(self, words):
        """COMPREPLY for the words, from the generated script in a real bash."""
        bindir = os.path.join(self.tmp, "bin")
        os.makedirs(bindir, exist_ok=True)
        with open(os.path.join(bindir, "attune"), "w") as f:
            f.write('#!/bin/sh\nexec %s "$@"\n' % " ".join('"%s"' % word for word in attune_argv()))
        os.chmod(os.path.join(bindir, "attune"), 0o755)
        # COMP_WORDS as bash makes them: broken at = and : (COMP_WORDBREAKS), each its own word
        line = " ".join(words)
        broken = [part for word in words for part in re.split(r"([=:])", word) if part] or [""]
        if not words[-1]:
            broken.append("")
        driver = ('source "$1"; COMP_LINE="$2"; COMP_POINT=${#COMP_LINE}; shift 2; COMP_WORDS=("$@"); '
                  'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _attune; printf "%s\\n" "${COMPREPLY[@]}"')
        script = os.path.join(self.tmp, "completion.bash")
        with open(script, "w") as f:
            f.write(self.script("bash"))
        env = self.process_env({"PATH": bindir + os.pathsep + os.environ.get("PATH", "")})
        out = subprocess.check_output(["bash", "-c", driver, "bash", script, line] + broken, env=env,
                                      universal_newlines=True, timeout=60)
        return out.split()

    @unittest.skipUnless(shutil.which("bash"), "bash")
    def test_bash_completes_commands_options_and_profiles(self):
        self.seed("prod")
        self.seed("staging", current=False)
        self.assertEqual(self.complete_in_bash(["attune", ""])[:3], ["auth", "config", "pack"])
        self.assertEqual(self.complete_in_bash(["attune", "auth", "lo"]), ["login", "logout"])
        self.assertEqual(self.complete_in_bash(["attune", "auth", "login", "--pass"]),
                         ["--password-stdin", "--password"])
        self.assertEqual(self.complete_in_bash(["attune", "-p", ""]), ["default", "prod", "staging"])
        self.assertEqual(self.complete_in_bash(["attune", "-p", "prod", "execution", "li"]), ["list"])
        self.assertIn("--top-level-only", self.complete_in_bash(["attune", "execution", "list", "--"]))
        self.assertEqual(self.complete_in_bash(["attune", "--output", ""]), ["table", "json", "yaml", "ndjson"])

    @unittest.skipUnless(shutil.which("bash"), "bash")
    @slow
    def test_bash_completes_refs_and_parameters_from_the_server(self):
        self.seed()
        self.assertEqual(self.complete_in_bash(["attune", "run", "core.e"]), ["core.echo"])
        self.assertEqual(self.complete_in_bash(["attune", "run", ""]), ["core.", "linux.", "examples."])
        self.assertEqual(self.complete_in_bash(["attune", "pack", "show", "li"]), ["linux"])
        # bash puts each candidate in place of what follows its last word break (= or :)
        self.assertEqual(self.complete_in_bash(["attune", "run", "core.echo", "--param="]),
                         ["=message=", "=count="])
        self.assertEqual(self.complete_in_bash(["attune", "run", "examples.deploy", "--param=env=p"]),
                         ["production"])
        self.assertEqual(self.complete_in_bash(["attune", "run", "examples.deploy", "--param", "env="]),
                         ["=staging", "=production", "=3"])
        self.assertEqual(self.complete_in_bash(["attune", "--output=y"]), ["yaml"])
        self.assertEqual(self.complete_in_bash(["attune", "pack", "li"]), ["list"])  # no request for that
        self.assertEqual(self.server.log(), ["GET /api/v1/actions/search", "GET /api/v1/packs", "GET /api/v1/packs",
                                             "GET /api/v1/actions/core.echo", "GET /api/v1/actions/examples.deploy",
                                             "GET /api/v1/actions/examples.deploy"])

    def test_install_writes_where_each_shell_looks(self):
        home = self.env["HOME"]
        for shell, env, target in (
                ("bash", {}, os.path.join(home, ".local", "share", "bash-completion", "completions", "attune")),
                ("bash", {"XDG_DATA_HOME": os.path.join(self.tmp, "data")},
                 os.path.join(self.tmp, "data", "bash-completion", "completions", "attune")),
                ("fish", {}, os.path.join(home, ".config", "fish", "completions", "attune.fish")),
                ("zsh", {}, os.path.join(home, ".zsh", "completions", "_attune"))):
            with self.subTest(shell=shell, env=env):
                result = self.ok("completion", "install", shell, env=env)
                self.assertEqual(result.out.splitlines()[0], "Installed %s completion to %s" % (shell.title(), target))
                with open(target) as f:
                    self.assertEqual(f.read(), self.script(shell))
                self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), new_file_mode())
        self.assertIn("fpath=(~/.zsh/completions $fpath)", self.ok("completion", "install", "zsh").out)
        with open(os.path.join(home, ".zshrc"), "w") as f:  # what it says to add, added: nothing more to say
            f.write("fpath=(~/.zsh/completions $fpath)\nautoload -Uz compinit && compinit\n")
        self.assertEqual(self.ok("completion", "install", "zsh").out.splitlines(),
                         ["Installed Zsh completion to %s" % os.path.join(home, ".zsh", "completions", "_attune")])
        zdotdir = os.path.join(self.tmp, "zdot")  # zsh reads $ZDOTDIR/.zshrc instead, when it is set
        os.makedirs(zdotdir)
        self.assertIn("fpath=(~/.zsh/completions $fpath)",
                      self.ok("completion", "install", "zsh", env={"ZDOTDIR": zdotdir}).out)
        self.assertEqual(self.ok("completion", "install", "fish", "-j").json()["shell"], "fish")
        self.assertIn("needs the shell", self.fails(2, "completion", "install").err)
        self.fails(2, "completion", "install", "powershell")
        self.fails(2, "completion", "bash", "zsh")
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_install_for_bash_says_what_to_add_where_bash_completion_is_missing(self):
        """The user's completion directory is read by the bash-completion package: where it is
        missing, install says so and prints the line for ~/.bashrc, and that line alone makes
        Tab work in a bash without the package; where it is present, nothing more is needed."""
        present = os.path.join(self.tmp, "bash_completion")
        with open(present, "w") as f:
            f.write("# the package\n")
        target = attune.completion_target("bash", self.env)
        with mock.patch.object(attune, "BASH_COMPLETION_FILES", (os.path.join(self.tmp, "missing"), present)):
            result = self.ok("completion", "install", "bash")
            self.assertEqual((result.out.splitlines(), result.err), (["Installed Bash completion to %s" % target], ""))
        with mock.patch.object(attune, "BASH_COMPLETION_FILES", (os.path.join(self.tmp, "missing"),)):
            result = self.ok("completion", "install", "bash")
            self.assertEqual(result.out.splitlines(), ["Installed Bash completion to %s" % target,
                                                       "Add this to ~/.bashrc, then restart Bash:",
                                                       ". %s" % attune.shell_quote(target)])
            self.assertIn("bash-completion is not installed here", result.err)
            doc = self.ok("completion", "install", "bash", "-j").json()
            self.assertEqual((doc["add_to"], doc["lines"]), ("~/.bashrc", [". %s" % attune.shell_quote(target)]))
        if shutil.which("bash"):
            line = result.out.splitlines()[-1]
            shown = subprocess.run(["bash", "--norc", "--noprofile", "-c", line + "; complete -p attune"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=60)
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertIn(" attune", shown.stdout)

    def test_install_refuses_a_symbolic_link_at_the_target(self):
        target = attune.completion_target("bash", self.env)
        os.makedirs(os.path.dirname(target))
        kept = os.path.join(self.tmp, "my-own-script")
        with open(kept, "w") as f:
            f.write("# mine\n")
        for link_to in (kept, os.path.join(self.tmp, "nothing-there")):
            with self.subTest(link_to=link_to):
                os.symlink(link_to, target)
                result = self.fails(3, "completion", "install", "bash")
                self.assertIn("is a symbolic link", result.err)
                self.assertEqual(os.readlink(target), link_to)
                os.unlink(target)
        with open(kept) as f:
            self.assertEqual(f.read(), "# mine\n")
        self.ok("completion", "install", "bash")
        self.assertFalse(os.path.islink(target))

    def test_powershell_script_names_every_command_and_option(self):
        script = self.script("powershell")
        self.assertIn("Register-ArgumentCompleter -Native -CommandName attune, attune.py", script)
        for path, options, _, children in attune.command_tree():
            if children:
                self.assertIn("    '%s' = @(%s)" % (" ".join(path), ", ".join("'%s'" % c for c in children)), script)
            self.assertIn("    '%s' = @(%s)" % (" ".join(path), ", ".join("'%s'" % o for o in options)), script)
        if shutil.which("pwsh"):
            path = os.path.join(self.tmp, "completion.ps1")
            with open(path, "w") as f:
                f.write(script)
            self.assertEqual(subprocess.call(["pwsh", "-NoProfile", "-File", path]), 0)

    def test_completion_never_creates_the_credential_file(self):
        self.script("bash")
        self.assertEqual(self.ok("config", "profiles", "--names").out, "default\n")
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_every_command_and_option_is_in_the_scripts(self):
        bash, fish = self.script("bash"), self.script("fish")
        for _path, options, _, children in attune.command_tree():
            for child in children:
                self.assertIn(child, bash)
                self.assertIn(child, fish)
            for option in options:
                self.assertIn(option, bash)
        self.assertTrue(self.script("zsh").startswith("#compdef attune\n"))

    def test_shells_accept_the_scripts(self):
        for shell, check in (("bash", ["bash", "-n"]), ("zsh", ["zsh", "-n"]), ("fish", ["fish", "-n"])):
            with self.subTest(shell):
                if not shutil.which(check[0]):
                    self.skipTest("%s is not installed" % shell)
                self.check_script(shell, check)

    def check_script(self, shell, check):
        path = os.path.join(self.tmp, "completion." + shell)
        with open(path, "w") as f:
            f.write(self.script(shell))
        self.assertEqual(subprocess.call(check + [path]), 0, shell)

    def attune_on_path(self):
        """A PATH whose attune is this attune.py, as the scripts call it."""
        bindir = os.path.join(self.tmp, "bin")
        os.makedirs(bindir, exist_ok=True)
        with open(os.path.join(bindir, "attune"), "w") as f:
            f.write('#!/bin/sh\nexec %s "$@"\n' % " ".join('"%s"' % word for word in attune_argv()))
        os.chmod(os.path.join(bindir, "attune"), 0o755)
        return bindir + os.pathsep + os.environ.get("PATH", "")

    @unittest.skipUnless(shutil.which("zsh"), "zsh")
    @slow
    def test_zsh_completes_commands_refs_and_parameters(self):
        """The zsh script in a real zsh, called as its bashcompinit calls it, the matches
        filtered as compadd filters them."""
        self.seed()
        script = os.path.join(self.tmp, "completion.zsh")
        with open(script, "w") as f:
            f.write(self.script("zsh"))
        driver = ('autoload -U compinit && compinit -u -D; autoload -U +X bashcompinit && bashcompinit; '
                  'source "$1"; shift; words=("$@"); CURRENT=${#words}; COMP_LINE="$words"; '
                  'COMP_CWORD=$((CURRENT - 1)); COMP_WORDS=("${words[@]}"); COMP_POINT=${#COMP_LINE}; '
                  'compgen -o default -F _attune -- "${words[CURRENT]}" | while IFS= read -r m; do '
                  '[[ "$m" == "${words[CURRENT]}"* ]] && print -r -- "$m"; done; true')
        env = self.process_env({"PATH": self.attune_on_path(), "ZDOTDIR": self.tmp})

        def complete(*words):
            return subprocess.check_output(["zsh", "-f", "-c", driver, "zsh", script, "attune"] + list(words),
                                           env=env, universal_newlines=True, timeout=60).split()

        self.assertEqual(complete("auth", "lo"), ["login", "logout"])
        self.assertEqual(complete("--output=y"), ["--output=yaml"])  # zsh keeps the word whole
        self.assertEqual(complete("-p", ""), ["default"])
        self.assertEqual(complete("run", "core.e"), ["core.echo"])
        self.assertEqual(complete("run", "core.echo", "--param=m"), ["--param=message="])
        self.assertEqual(self.server.log(), ["GET /api/v1/actions/search", "GET /api/v1/actions/core.echo"])

    @unittest.skipUnless(shutil.which("fish"), "fish")
    @slow
    def test_fish_completes_refs_profiles_and_values(self):
        self.seed()
        self.seed("prod", current=False)
        path = os.path.join(self.tmp, "completion.fish")
        with open(path, "w") as f:
            f.write(self.script("fish"))
        env = self.process_env({"PATH": self.attune_on_path()})

        def complete(line):
            out = subprocess.check_output(["fish", "--no-config", "-c", "source %s; complete -C '%s'" % (path, line)],
                                          env=env, universal_newlines=True, timeout=60)
            return sorted(word.split("\t")[0] for word in out.splitlines())

        self.assertEqual(complete("attune run core.e"), ["core.echo"])
        self.assertLessEqual({"default", "prod"}, set(complete("attune -p ")))
        self.assertEqual(complete("attune --output=y"), ["--output=yaml"])
        self.assertEqual(complete("attune run core.echo --param="), ["--param=count=", "--param=message="])
        self.assertIn("GET /api/v1/actions/search", self.server.log())

    @unittest.skipUnless(shutil.which("fish"), "fish")
    def test_fish_completes_options_of_the_command_at_hand(self):
        self.seed("prod")
        path = os.path.join(self.tmp, "completion.fish")
        with open(path, "w") as f:
            f.write(self.script("fish"))
        env = self.process_env({"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
        out = subprocess.check_output(["fish", "-c", "source %s; complete -C 'attune auth login --pass'" % path],
                                      env=env, universal_newlines=True)
        self.assertEqual(sorted(out.split()), ["--password", "--password-stdin"])



class CompleteTests(ResourceTestCase):
    """`attune __complete`: what each place on the line completes to, and the exact
    requests it costs (none for commands, options and choices; one for refs and ids)."""

    def complete(self, line, *argv, env=None):
        """The candidates for the last word of line (a trailing space: a new, empty word)."""
        words = line.split(" ") if line else [""]
        result = self.ok(*(("__complete",) + argv + ("--",) + tuple(words)), env=env)
        self.assertEqual(result.err, "")
        return result.out.splitlines()

    def test_help_completes_commands_and_topics(self):
        """help <Tab> offers what `help` takes: the top level and the topics, then the commands
        below the words given (never file names, and no request)."""
        self.assertEqual(self.complete("help "), attune.TOP_LEVEL + list(attune.HELP_TOPIC_NAMES))
        self.assertEqual(sorted(attune.HELP_TOPIC_NAMES), sorted(attune.HELP_TOPICS))
        self.assertEqual(self.complete("help ex"), ["execution", "exit-codes"])
        self.assertEqual(self.complete("help pack "), [n for n, _, _ in attune.children(("pack",))])
        self.assertEqual(self.complete("help queue items re"), ["reprioritize"])
        self.assertEqual(self.complete("help pack list "), [])
        self.assertEqual(self.server.log(), [])

    def test_each_place_on_the_line(self):
        table = attune.completion_table()["commands"]
        packs = "GET /api/v1/packs?page_size=100"
        global_options = list(attune.completion_table()["global"])
        own = [f for flags, _ in attune.find_command(("run",)).arguments if flags[0].startswith("-") for f in flags]
        run_options = own + [o for o in global_options if o not in own]
        for line, expected, requests in (
                ("", attune.TOP_LEVEL, []),
                ("pa", ["pack"], []),
                ("pack ", table["pack"]["children"], []),
                ("pack l", ["list"], []),
                ("-p default pack l", ["list"], []),
                ("pack list --a", ["--all", "--api-url"], []),
                ("--output ", ["table", "json", "yaml", "ndjson"], []),
                ("--output=y", ["--output=yaml"], []),
                ("-p ", ["default"], []),
                ("--profile=d", ["--profile=default"], []),
                ("--profile=x", [], []),
                ("auth t", ["token", "token-login"], []),
                ("auth token ", table["auth token"]["children"], []),
                ("completion ", ["bash", "zsh", "fish", "powershell", "install"], []),
                ("completion install z", ["zsh"], []),
                ("run core.echo --timeout ", [], []),
                ("run core.echo ", run_options, []),  # its own options, then the global ones
                ("action execute core.echo --watch ", run_options, []),
                ("pack show core ", global_options, []),
                ("nonsense ", [], []),
                ("run ", ["core.", "linux.", "examples."], [packs]),
                ("run co", ["core."], [packs]),
                ("run core.", ["core.echo", "core.sleep", "core.fail", "core.noisy"],
                 ["GET /api/v1/actions/search?q=core.&page_size=100"]),
                ("run core.e", ["core.echo"], ["GET /api/v1/actions/search?q=core.e&page_size=100"]),
                ("run --watch --timeout 5 core.e", ["core.echo"], ["GET /api/v1/actions/search?q=core.e&page_size=100"]),
                ("action execute linux.", ["linux.uptime"], ["GET /api/v1/actions/search?q=linux.&page_size=100"]),
                ("action show ex", ["examples."], [packs]),
                ("run core.echo --param ", ["message=", "count="], ["GET /api/v1/actions/core.echo"]),
                ("run core.echo --param c", ["count="], ["GET /api/v1/actions/core.echo"]),
                ("run core.echo --param=", ["--param=message=", "--param=count="], ["GET /api/v1/actions/core.echo"]),
                ("run examples.deploy --param env=", ["env=staging", "env=production", "env=3"],
                 ["GET /api/v1/actions/examples.deploy"]),
                ("run examples.deploy --param=env=p", ["--param=env=production"], ["GET /api/v1/actions/examples.deploy"]),
                ("run core.echo --param message=", [], ["GET /api/v1/actions/core.echo"]),
                ("run --param ", [], []),
                ("pack show ", ["core", "linux", "examples"], [packs]),
                ("pack show l", ["linux"], [packs]),
                ("rule enable l", ["linux.on_file"], ["GET /api/v1/rules?page_size=100"]),
                ("rule show ", ["examples.on_timer", "linux.on_file"], ["GET /api/v1/rules?page_size=100"]),
                ("trigger show core.", ["core.timer", "core.webhook"], ["GET /api/v1/triggers?page_size=100"]),
                ("sensor show ", ["core.timer_sensor", "linux.file_watch_sensor"], ["GET /api/v1/sensors?page_size=100"]),
                ("workflow show ", ["examples.deploy"], ["GET /api/v1/workflows?page_size=100"])):
            with self.subTest(line=line):
                self.server.requests.clear()
                self.assertEqual(self.complete(line), list(expected))
                self.assertEqual(self.targets(), requests)

    def test_execution_ids_the_most_recent_first(self):
        first, second = self.execute("core.echo", "message=a"), self.execute("core.echo", "message=b")
        for line in ("execution show ", "execution watch ", "execution logs ", "execution cancel "):
            with self.subTest(line=line):
                self.server.requests.clear()
                self.assertEqual(self.complete(line), [str(second), str(first)])
                self.assertEqual(self.targets(), ["GET /api/v1/executions?per_page=100"])
        self.assertEqual(self.complete("execution show %s" % str(second)[:-1]),
                         [str(i) for i in (second, first) if str(i).startswith(str(second)[:-1])])

    def test_event_enforcement_and_worker_ids_the_most_recent_first(self):
        for line, expected, path in (("event show ", ["502", "501"], "/events"),
                                     ("enforcement list --event 50", ["502", "501"], "/events"),
                                     ("enforcement show ", ["601"], "/enforcements"),
                                     ("enforcement show 7", [], "/enforcements"),
                                     ("worker cordon ", ["2", "1"], "/workers?page_size=100")):
            with self.subTest(line=line):
                self.server.requests.clear()
                self.assertEqual(self.complete(line), expected)
                self.assertEqual(self.targets(), ["GET /api/v1%s" % (path if "?" in path else path + "?per_page=100")])

    def test_the_cursor_picks_the_word(self):
        self.assertEqual(self.complete("run co extra words", "--cursor", "1"), ["core."])
        self.assertEqual(self.complete("run", "--cursor", "1"), ["core.", "linux.", "examples."])  # a new word
        self.assertEqual(self.complete("pack l", "--cursor", "9"), [])  # past the end: after `l`, nothing
        self.assertEqual(self.complete("pa", "--cursor", "0"), ["pack"])
        for bad in ("x", "-1", ""):
            self.assertEqual(self.complete("pa", "--cursor", bad), [])
        self.assertEqual(self.ok("__complete").out.splitlines(), attune.TOP_LEVEL)

    def test_global_options_may_come_before_complete(self):
        """`attune -p NAME __complete ...` (a shell function that passes the user's options
        first, as the Rust CLI takes them): read as if the options began the words, the cursor
        still counting from the words after __complete."""
        other = FakeAttune().start()
        self.addCleanup(other.stop)
        self.seed("elsewhere", current=False, api_url=other.url)
        for argv in (["-p", "elsewhere", "__complete", "--", "pack", "show", "c"],
                     ["--profile=elsewhere", "-j", "__complete", "--cursor", "2", "pack", "show", "c", "more"],
                     ["--config", self.config, "-p", "elsewhere", "__complete", "pack", "show", "c"],
                     ["-pelsewhere", "__complete", "--", "pack", "show", "c"]):
            with self.subTest(argv=argv):
                before = other.count()
                self.assertEqual(self.ok(*argv).out, "core\n")
                self.assertEqual(other.count(), before + 1)
        self.assertEqual(self.ok("-j", "__complete", "--", "pa").out, "pack\n")
        self.assertEqual(self.server.count(), 0)
        self.assertIn("unknown option '--bogus'", self.fails(2, "--bogus", "__complete", "--", "pa").err)

    def test_the_profile_and_url_on_the_line_choose_the_session(self):
        other = FakeAttune().start()
        self.addCleanup(other.stop)
        self.seed("elsewhere", current=False, api_url=other.url)
        self.assertEqual(self.complete("-p elsewhere pack show c"), ["core"])
        self.assertEqual((self.server.count(), other.count()), (0, 1))
        self.assertEqual(self.complete("--profile=elsewhere pack show c"), ["core"])
        self.assertEqual(other.count(), 2)
        self.assertEqual(self.complete("pack show c", env={"ATTUNE_PROFILE": "elsewhere"}), ["core"])
        self.assertEqual(other.count(), 3)
        # another URL for the current profile: its tokens are not sent there (the origin rule)
        self.assertEqual(self.complete("--api-url %s pack show c" % other.url), [])
        self.assertEqual(other.count(), 3)
        env_token = other.mint("admin")
        self.assertEqual(self.complete("pack show c", env={"ATTUNE_API_URL": other.url,
                                                           "ATTUNE_API_TOKEN": env_token}), ["core"])
        self.assertEqual(other.requests[-1].token, env_token)
        self.assertEqual(self.complete("-p nope pack show c"), [])
        self.assertEqual(self.complete("-p  pack show c"), [])  # an empty profile name

    def test_nothing_without_a_session_and_nothing_on_stderr_when_it_fails(self):
        for status in (401, 403, 500, 503):
            with self.subTest(status=status):
                self.server.fail("/api/v1/packs", status=status, body={"error": "no", "code": "X"}, times=None)
                self.assertEqual(self.complete("run "), [])
                self.server.faults.clear()
        self.server.fail("/api/v1/packs", status=200, body="not json at all", times=1)
        self.assertEqual(self.complete("pack show "), [])
        self.server.fail("/api/v1/packs", drop=True, times=None)
        self.assertEqual(self.complete("pack show "), [])
        self.server.faults.clear()
        os.remove(self.config)
        self.server.requests.clear()
        self.assertEqual(self.complete("run "), [])
        self.assertEqual(self.complete("-p "), ["default"])
        self.assertEqual(self.server.count(), 0)  # no token: no request at all
        self.assertFalse(os.path.exists(self.config))

    def test_only_what_a_shell_can_take_as_it_is(self):
        """Generated refs from a hostile server: each candidate printed is one the server
        sent, made of letters, digits and ._-+=,:@/% only, at most 256 characters; every
        such ref is printed."""
        rng = random.Random(20261203)
        safe = "abcxyzABC019._-+=,:@/%éж"
        hostile = " \t\n\r\x1b\x07\x00\x7f\x9b'\"$`;|&<>()*?!#{}[]\\~^\u202e\u2066\ufeff"
        for _ in range(5):  # five pages' worth: a page holds 100
            refs = []
            while len(refs) < 100:
                text = "".join(rng.choice(safe) for _ in range(rng.randrange(1, 12)))
                if len(refs) % 2:
                    at = rng.randrange(len(text) + 1)
                    text = text[:at] + rng.choice(hostile) + text[at:]
                text = text if len(refs) % 37 else text * 40
                if text not in refs:
                    refs.append(text)
            self.server.packs = {ref: self.server.new_pack(i + 1, ref, "x") for i, ref in enumerate(refs)}
            expected = [r for r in refs if len(r) <= 256 and not any(c in hostile for c in r)]
            self.assertEqual(self.complete("pack show "), expected)
            self.assertTrue(35 < len(expected) < 65, len(expected))

    @slow
    def test_a_rejected_token_refreshes_and_the_rotation_is_stored(self):
        """In a real process: the 401 leads to one refresh, stored as any command stores it,
        and the search is sent again with the new token."""
        old = self.read_doc()["profiles"]["default"]
        self.server.revoked.add(old["auth_token"])  # unexpired, but the server says no
        result = self.run_process("__complete", "--cursor", "1", "run", "core.")
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(result.out.splitlines(), ["core.echo", "core.sleep", "core.fail", "core.noisy"])
        self.assertEqual(self.server.log(), ["GET /api/v1/actions/search", "POST /auth/refresh",
                                             "GET /api/v1/actions/search"])
        stored = self.read_doc()["profiles"]["default"]
        self.assertNotEqual(stored["auth_token"], old["auth_token"])
        self.assertNotEqual(stored["refresh_token"], old["refresh_token"])
        self.assertEqual(self.server.requests[-1].token, stored["auth_token"])
        self.assertIn(stored["refresh_token"], self.server.issued)

    @slow
    def test_a_slow_server_is_given_up_on_within_the_budget(self):
        """A server that answers after a minute, or a byte a second: the process ends by
        itself (the budget is 2 s; the test waits up to 50), with nothing to say."""
        for fault in ({"delay": 60}, {"status": 200, "body": {"items": [{"ref": "core.echo"}]}, "dribble": 1.0}):
            with self.subTest(fault=sorted(fault)):
                self.server.faults.clear()
                self.server.fail("/api/v1/actions/search", times=None, **fault)
                result = self.run_process("__complete", "--", "run", "core.", timeout=50)
                self.assertEqual((result.code, result.out, result.err), (0, "", ""))

    @slow
    def test_without_a_credential_file_nothing_is_created(self):
        os.remove(self.config)
        os.rmdir(os.path.dirname(self.config))
        elsewhere = os.path.join(self.tmp, "not", "there", "credentials.json")
        for env in ({}, {"ATTUNE_CONFIG": elsewhere}):
            for words in (["run", "core."], ["-p", ""], ["pack", "show", ""], ["auth", "lo"]):
                result = self.run_process("__complete", "--", *words, env=env)
                self.assertEqual((result.code, result.err), (0, ""), words)
        self.assertEqual(self.server.count(), 0)
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "not")))

    def test_repeated_candidates_once(self):
        self.server.packs = {"p%d" % i: self.server.new_pack(i + 1, "p%d" % (i % 3), "x") for i in range(100)}
        self.assertEqual(self.complete("pack show "), ["p0", "p1", "p2"])


# === Tests: hardening ========================================================
# Faults, load and hostile input: each shows the right exit code, one clear error
# line on stderr, no traceback, and the credential file unchanged unless the
# command was meant to change it.

class HardeningTests(AttuneTestCase):
    def assert_clean_failure(self, code, *argv, unchanged=True, **kwargs):
        """Run a command that must fail cleanly; its one error line."""
        before = self.snapshot()[0] if unchanged and os.path.exists(self.config) else None
        result = self.fails(code, *argv, **kwargs)
        lines = result.err.splitlines()
        errors = [line for line in lines if line.startswith("attune: error: ")]
        self.assertEqual(len(errors), 1, result)
        self.assertEqual([line for line in lines if not line.startswith("attune: ")], [], result)
        if before is not None:
            self.assertEqual(self.snapshot()[0], before)
        return errors[0]

    # 1. broken credential files
    def test_broken_credential_files(self):
        rng = random.Random(5)
        cases = {"empty": b"", "truncated": b'{"version": 1, "profiles": {"a": {"api_url": "http://x"',
                 "array": b"[1, 2]", "profiles of the wrong type": b'{"profiles": "none"}',
                 "invalid UTF-8": b'{"profiles": {"\xc3\x28": {}}}',
                 "10 MB of random bytes": bytes(rng.getrandbits(8) for _ in range(1 << 16)) * 160,
                 "10 MB of text": b"x" * (10 << 20)}
        os.makedirs(os.path.dirname(self.config))
        for name, data in cases.items():
            with self.subTest(name):
                with open(self.config, "wb") as f:
                    f.write(data)
                os.chmod(self.config, 0o600)
                for argv in (("auth", "whoami"), ("config", "set", "description", "x"), ("auth", "token")):
                    line = self.assert_clean_failure(3, *argv)
                    self.assertIn(self.config, line)
                    self.assertIn("move it aside", line)

    def test_a_profile_without_api_url(self):
        self.seed("good")
        doc = self.read_doc()
        doc["profiles"]["bad"] = {"auth_token": "x"}
        self.write_doc(doc)
        line = self.assert_clean_failure(3, "-p", "bad", "auth", "whoami")
        self.assertIn("profile 'bad' in %s has no api_url; run: attune config set api_url URL" % self.config, line)
        self.ok("-p", "good", "auth", "whoami")  # the sound profile still works

    def test_version_99_is_read_and_never_rewritten(self):
        self.seed(access_left=-100)
        doc = self.read_doc()
        doc["version"] = 99
        self.write_doc(doc)
        self.ok("auth", "status", "--offline")
        line = self.assert_clean_failure(3, "auth", "whoami")  # the refresh would have to write
        self.assertIn("written by a newer attune.py (version 99)", line)
        self.assertEqual(self.server.count(), 0)

    # 2. permissions and paths
    @unittest.skipUnless(POSIX, "permissions")
    def test_a_directory_that_is_not_writable(self):
        self.seed()
        directory = os.path.dirname(self.config)
        for parent in (self.env["HOME"], os.path.dirname(directory)):
            os.chmod(parent, 0o755)  # Python 3.6's makedirs made them 0700 too
        give_to_nobody(directory, self.config)
        os.chmod(directory, 0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        env = self.process_env()
        reads = run_unprivileged(self, ["auth", "whoami"], env)
        self.assertEqual(reads.code, 0, reads)
        inode, names = os.stat(self.config).st_ino, sorted(os.listdir(directory))
        writes = run_unprivileged(self, ["config", "set", "description", "x"], env)  # the file is theirs
        self.assertEqual(writes.code, 0, writes)
        self.assertEqual(self.profile()["description"], "x")
        self.assertEqual((os.stat(self.config).st_ino, sorted(os.listdir(directory))), (inode, names))
        os.remove(self.config)  # no file: none can be made there
        writes = run_unprivileged(self, ["config", "set", "description", "x"], env)
        self.assertEqual(writes.code, 3, writes)
        self.assertIn("cannot write credential file %s" % self.config, writes.err)
        self.assertIn("--config FILE or ATTUNE_CONFIG", writes.err)
        self.assertNotIn("Traceback", writes.err)
        self.assertEqual(os.listdir(directory), [])

    def test_no_home_at_all(self):
        env = {"HOME": None, "ATTUNE_CONFIG": None, "ATTUNE_API_URL": self.server.url,
               "ATTUNE_API_TOKEN": self.server.mint("admin")}
        with mock.patch("os.path.expanduser", lambda path: path):  # no HOME, no password entry
            self.ok("auth", "whoami", env=env)
            self.ok("auth", "status", env=env)
            line = self.assert_clean_failure(3, "config", "set", "description", "x", env=env)
            self.assertIn("HOME is not set; choose another location with --config FILE or ATTUNE_CONFIG, or give a "
                          "token in ATTUNE_API_TOKEN", line)
            report = json.loads(self.run_cli("auth", "doctor", "-j", env=env).out)
            self.assertIn("HOME is not set", " ".join(report["notes"]))
            self.assertEqual(report["problems"], [])
            # no token either: the login that would be next cannot store its session, as doctor says
            result = self.run_cli("auth", "doctor", "-j", env=dict(env, ATTUNE_API_TOKEN=None))
            self.assertEqual(result.code, 3, result)
            self.assertIn("HOME is not set", " ".join(json.loads(result.out)["problems"]))
        self.assertEqual(os.listdir(self.tmp), [])

    @unittest.skipUnless(IS_ROOT and os.path.exists("/usr/bin/python3"), "runs as nobody, whose home is absent")
    def test_no_home_variable_in_a_real_process(self):
        env = self.process_env({"HOME": None, "ATTUNE_CONFIG": None, "ATTUNE_API_URL": self.server.url,
                                "ATTUNE_API_TOKEN": self.server.mint("admin")})
        self.assertEqual(run_unprivileged(self, ["auth", "whoami"], env).code, 0)
        refused = run_unprivileged(self, ["config", "set", "description", "x"], env)
        self.assertEqual(refused.code, 3, refused)
        self.assertIn("--config FILE or ATTUNE_CONFIG", refused.err)

    # 3. atomicity
    def test_stale_temp_files_are_ignored_then_cleaned(self):
        self.seed()
        directory = os.path.dirname(self.config)
        old = os.path.join(directory, ".credentials.json.dead1234.tmp")
        fresh = os.path.join(directory, ".credentials.json.live5678.tmp")
        for path in (old, fresh):
            with open(path, "w") as f:
                f.write('{"half": ')
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        self.ok("auth", "whoami")  # reads ignore them
        self.ok("config", "set", "description", "x")  # a write removes the old one only
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(fresh))

    @unittest.skipUnless(POSIX, "SIGKILL")
    @slow
    def test_200_writers_killed_at_random_moments(self):
        # each writer pauses a moment between writes, so that all eight get the lock in turn
        writer = ("import os, sys, time, attune\n"
                  "store = attune.CredentialStore(sys.argv[1], print, print, 60.0)\n"
                  "blob = 'x' * 100000\n"
                  "n = 0\n"
                  "while True:\n"
                  "    n += 1\n"
                  "    store.modify(lambda d: d['profiles'].__setitem__('w%s' % sys.argv[2],"
                  " {'api_url': 'http://x', 'n': n, 'pid': os.getpid(), 'blob': blob}))\n"
                  "    time.sleep(0.01)\n")
        self.seed()
        rng = random.Random(11)
        killed = []
        for _ in range(25):
            writers = [subprocess.Popen([sys.executable, "-c", writer, self.config, str(i)], cwd=HERE,
                                        stdout=subprocess.DEVNULL) for i in range(8)]
            self.wait_for_writes(writers)
            for p in writers:
                time.sleep(rng.uniform(0.0, 0.02))
                p.kill()
            killed += [p.wait() for p in writers]
            doc = self.read_doc()  # parses, after every round
            self.assertIn("auth_token", doc["profiles"]["default"])
            self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
        self.assertEqual(killed, [-signal.SIGKILL] * 200)  # every writer was still writing when killed
        for name in os.listdir(os.path.dirname(self.config)):  # leftovers are only temp files
            self.assertTrue(name in ("credentials.json", "credentials.json.lock") or name.endswith(".tmp"), name)
            if name.endswith(".tmp"):
                os.utime(os.path.join(os.path.dirname(self.config), name), (0, 0))
        self.ok("config", "set", "description", "after")
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.config))),
                         ["credentials.json", "credentials.json.lock"])

    # 5. server faults
    def test_server_answers_that_make_no_sense(self):
        self.seed()
        faults = {"HTML 502": (dict(status=502, times=None, body="<html><h1>502 Bad Gateway</h1></html>",
                                    headers={"Content-Type": "text/html"}), 6, "502 Bad Gateway"),
                  "invalid JSON with 200": (dict(status=200, body=b'{"data": {"id": 1'), 1, "body that is not JSON"),
                  "200 without data": (dict(status=200, body={"id": 1, "login": "admin"}), 1, 'no "data" object'),
                  "empty 200": (dict(status=200, body=None), 1, "with an empty body"),
                  "204": (dict(status=204), 1, "204 No Content with an empty body"),
                  "reset mid-body": (dict(status=200, times=None, body={"data": {}}, truncate=True), 5,
                                     "closed unexpectedly"),
                  "429": (dict(status=429, body={"error": "Rate limit exceeded", "code": "TOO_MANY_REQUESTS"},
                               headers={"Retry-After": "30"}), 1, "Rate limit exceeded (the server asks to retry "
                                                                  "after 30 s)")}
        for name, (fault, code, text) in faults.items():
            with self.subTest(name):
                self.server.faults[:] = []
                self.server.fail("/auth/me", **fault)
                self.assertIn(text, self.assert_clean_failure(code, "auth", "whoami"))

    def test_401_on_every_request(self):
        self.seed()
        self.server.fail("/auth/me", status=401, times=None, body={"error": "Unauthorized", "code": "UNAUTHORIZED"})
        line = self.assert_clean_failure(4, "auth", "whoami", unchanged=False)  # the refresh was stored
        self.assertIn("rejected the refreshed token", line)
        self.assertEqual(self.server.log(), ["GET /auth/me", "POST /auth/refresh", "GET /auth/me"])

    def test_refresh_answers_with_tokens_that_are_not_jwts(self):
        self.seed(access_left=-100)
        self.server.opaque["opaque-access-1"] = "admin"
        self.server.fail("/auth/refresh", status=200, body={"data": {
            "access_token": "opaque-access-1", "refresh_token": "opaque-refresh-1", "expires_in": 3600}})
        self.ok("auth", "whoami")
        stored = self.profile()
        self.assertEqual((stored["auth_token"], stored["refresh_token"]), ("opaque-access-1", "opaque-refresh-1"))
        self.assertAlmostEqual(stored["auth_token_expires_at"], time.time() + 3600, delta=5)
        self.assertIsNone(stored["refresh_token_expires_at"])  # not a JWT: unknown
        self.server.opaque["opaque-access-2"] = "admin"
        self.server.revoked.add("opaque-access-1")
        self.server.opaque.pop("opaque-access-1")
        self.server.fail("/auth/refresh", status=200, body={"data": {
            "access_token": "opaque-access-2", "refresh_token": "opaque-refresh-2"}})  # no expires_in either
        self.ok("auth", "whoami")
        self.assertIsNone(self.profile()["auth_token_expires_at"])
        self.ok("auth", "whoami")  # unknown expiry: just send it
        self.assertRegex(self.ok("auth", "status", "--offline").out, r"Access token:\s+unknown expiry")

    # 6. JWTs that are not quite JWTs
    def test_malformed_jwts_never_crash(self):
        def token(payload):
            return "eyJhbGciOiJIUzI1NiJ9." + payload + ".c2ln"
        cases = {"missing exp": token(b64url(b'{"iat": 1, "login": "admin"}')),
                 "exp as a string": token(b64url(b'{"exp": "soon"}')),
                 "not base64": token("!!!!@@@@"), "not JSON": token(b64url(b"<xml/>")),
                 "two parts": "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9", "100 KB": token("A" * 100000)}
        self.extra_secrets = set(cases.values())
        for name, access in cases.items():
            with self.subTest(name):
                self.seed(store_expiry=False, auth_token=access)
                status = self.ok("auth", "status", "--offline")
                self.assertRegex(status.out, r"Access token:\s+unknown expiry")
                self.assertEqual(self.ok("auth", "token", secrets_ok=True).out, access + "\n")
                if len(access) > 65536:  # servers refuse such a header line (431): a clean error
                    self.assertIn("431", self.assert_clean_failure(1, "auth", "whoami"))
                    continue
                self.ok("auth", "whoami")  # the server says 401; refresh and retry
                env = {"ATTUNE_API_TOKEN": access}
                self.assertEqual(self.ok("auth", "token", env=env, secrets_ok=True).out, access + "\n")
                self.assertIn("has expired or was rejected", self.assert_clean_failure(4, "auth", "whoami", env=env))

    # 8. a lock held by a hung process
    @unittest.skipUnless(POSIX, "fcntl")
    def test_a_hung_lock_holder_does_not_lose_its_update(self):
        self.seed("a", access_left=-100)
        self.seed("b", current=False)
        doc = self.read_doc()
        doc["profiles"]["b"]["description"] = "written by the hung process"
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, self.config + ".lock", "60", self.config,
                                   json.dumps(doc)], stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        result = self.ok("-p", "a", "auth", "whoami", env={"ATTUNE_LOCK_TIMEOUT": "0.3"})
        self.assertIn("gave up waiting 0.3s for the lock", result.err)
        self.assertIn("held by pid %d (attune auth login)" % holder.pid, result.err)
        after = self.read_doc()
        self.assertEqual(after["profiles"]["b"]["description"], "written by the hung process")
        self.assertNotEqual(after["profiles"]["a"]["auth_token"], doc["profiles"]["a"]["auth_token"])
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 1)


class LoadTests(AttuneTestCase):
    """64 processes a round, 5 rounds, 3 profiles in one file against a single-use server."""
    server_options = {"refresh_mode": "single-use"}

    @unittest.skipUnless(POSIX, "many processes")
    @slow
    def test_logins_refreshes_and_logouts_at_once(self):
        self.seed("logins")
        self.seed("logouts", current=False)
        doc = self.read_doc()
        doc["team"] = {"keep": True}
        self.write_doc(doc)
        for round_number in range(5):
            refresh_token = self.seed("refreshes", access_left=-100, current=False)["refresh_token"]
            self.seed("logouts", current=False)
            refreshes = self.server.count("POST", "/auth/refresh")
            kinds = ["login", "refresh", "logout"] * 22
            procs = []
            for kind in kinds[:64]:
                if kind == "login":
                    procs.append(self.spawn("-p", "logins", "auth", "login", "-u", "admin", "--password-stdin",
                                            stdin=subprocess.PIPE))
                elif kind == "refresh":
                    procs.append(self.spawn("-p", "refreshes", "auth", "whoami"))
                else:
                    procs.append(self.spawn("-p", "logouts", "auth", "logout"))
            for p, kind in zip(procs, kinds):
                out, err = p.communicate(PASSWORD + "\n" if kind == "login" else None, timeout=120)
                self.assertEqual(p.returncode, 0, (kind, err))
                self.assert_no_leak(Result(p.returncode, out, err))
            after = self.read_doc()
            self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
            self.assertEqual(after["team"], {"keep": True}, round_number)
            self.assertEqual(self.server.count("POST", "/auth/refresh") - refreshes, 1, round_number)
            refreshed = after["profiles"]["refreshes"]
            self.assertNotEqual(refreshed["refresh_token"], refresh_token)
            self.assertIn(refreshed["refresh_token"], self.server.issued)
            self.assertIn(after["profiles"]["logins"]["auth_token"], self.server.issued)
            self.assertNotIn("auth_token", after["profiles"]["logouts"])



# === Tests: SSO device login =================================================

BROWSER_SCRIPT = "#!/bin/sh\necho \"$1\" >> \"$(dirname \"$0\")/opened\"\n"


class SsoLoginTests(AttuneTestCase):
    def device_requests(self):
        return [r for r in self.server.requests if r.path.startswith("/auth/")]

    def assert_anonymous(self):
        self.assertTrue(all("Authorization" not in r.headers for r in self.device_requests()))
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    @slow
    def test_device_flow_logs_in_without_a_listener(self):
        result = self.run_process("auth", "sso-login", "--url", self.server.url, "--no-browser")
        self.assertEqual(result.code, 0, result)
        lines = result.err.splitlines()
        self.assertEqual(lines, ["Go to %s/device and enter code WDJB-MJHT." % self.server.url,
                                 "Waiting for approval. Press Ctrl+C to cancel."])
        self.assertIn("Successfully logged in as zoe", result.out)
        profile = self.profile()
        self.assertEqual((profile["auth_method"], profile["api_url"]), ("sso", self.server.url))
        self.assertEqual(self.server.log(), ["POST /auth/oidc/device/start"] + ["POST /auth/oidc/device/poll"] * 3)
        self.assert_anonymous()
        polls = [r.json()["device_code"] for r in self.server.requests if r.path.endswith("/poll")]
        self.assertEqual(len(set(polls)), 3)  # the newest re-sealed code each time (the fake spends old ones)
        self.ok("auth", "whoami")  # the stored session works like a password login's
        # --json: the same document as auth login --json
        doc = self.run_process("auth", "sso-login", "--no-browser", "--json").out
        self.assertEqual(sorted(json.loads(doc)), sorted(self.ok("auth", "login", "--if-needed", "--json").json()))

    def test_interval_slow_down_and_provider_timeout(self):
        self.server.device.update(enforce_interval=False, waits=3,
                                  reasons=["slow_down", "provider_timeout", "authorization_pending"])
        sleeps = []
        with mock.patch("attune.time.sleep", sleeps.append):
            self.ok("auth", "sso-login", "--url", self.server.url, "--no-browser")
        self.assertEqual(sleeps, [1, 6, 12, 12])  # +5, doubled, kept
        self.assert_anonymous()

    def test_denial_expiry_timeout_and_no_sso_write_nothing(self):
        self.server.device["waits"] = 0  # approved at the first poll: waiting is tested above
        self.seed()
        before = self.snapshot()[0]
        for outcome, code, message in (("access_denied", 1, "SSO device authorization was denied"),
                                       ("expired", 1, "SSO device code expired; start a new login")):
            self.server.device["outcome"] = outcome
            result = self.run_process("auth", "sso-login", "--no-browser")
            self.assertEqual((result.code, result.err.splitlines()[-1]), (code, "attune: error: " + message))
        self.server.device.update(outcome="authorized", interval=5)
        self.server.requests.clear()
        started = time.monotonic()
        result = self.run_process("auth", "sso-login", "--no-browser", "--timeout", "1")
        self.assertEqual(result.code, 1, result)
        self.assertIn("SSO device login timed out; start a new login", result.err)
        self.assertLess(time.monotonic() - started, 60)  # a hang guard: the log below shows the deadline
        self.assertEqual(self.server.log(), ["POST /auth/oidc/device/start"])  # the deadline cut the first wait
        self.server.device["enabled"] = False
        result = self.run_process("auth", "sso-login", "--no-browser")
        self.assertEqual(result.code, 1, result)
        self.assertIn("SSO is not configured on this server", result.err)
        self.assertEqual(self.snapshot()[0], before)
        self.assert_anonymous()

    def test_urls_must_be_https_unless_loopback(self):
        for url in ("http://attune.example.com", "http://10.0.0.1:8080"):
            result = self.run_process("auth", "sso-login", "--url", url, "--no-browser")
            self.assertEqual(result.code, 3, result)
            self.assertIn("must use HTTPS", result.err)
        self.assertEqual(self.server.log(), [])
        for field, value in (("verification_uri", "http://evil.example/device"),
                             ("verification_uri_complete", "https://user:pw@evil.example/"),
                             ("user_code", "\x1b]0;title\x07"), ("user_code", ""),
                             ("interval", 0), ("expires_in", 86401), ("interval", "5")):
            self.server.device["start"] = {field: value}
            result = self.run_process("auth", "sso-login", "--url", self.server.url, "--no-browser")
            self.assertEqual(result.code, 1, (field, result))
            self.assertEqual(len(result.err.splitlines()), 1, result)
            self.assertNotIn("\x1b", result.err)
        self.assertFalse(os.path.exists(self.config))

    @unittest.skipUnless(POSIX, "a shell script as BROWSER")
    @slow
    def test_the_browser_opens_only_with_a_display(self):
        self.server.device["waits"] = 0  # approved at the first poll: waiting is tested above
        script = os.path.join(self.tmp, "browser")
        with open(script, "w") as f:
            f.write(BROWSER_SCRIPT)
        os.chmod(script, 0o755)
        opened = os.path.join(self.tmp, "opened")
        for extra, argv, expected in (({"DISPLAY": ":0"}, [], True),
                                      ({"WAYLAND_DISPLAY": "wayland-0"}, [], True),
                                      ({"DISPLAY": ":0"}, ["--no-browser"], False),
                                      ({"DISPLAY": ":0", "SSH_CONNECTION": "10.0.0.2 5022 10.0.0.1 22"}, [], False),
                                      ({}, [], False)):
            with self.subTest(extra=extra, argv=argv):
                if os.path.exists(opened):
                    os.unlink(opened)
                env = dict(extra, BROWSER=script)
                result = self.run_process("auth", "sso-login", "--url", self.server.url, *argv, env=env)
                self.assertEqual(result.code, 0, result)
                if expected:
                    with open(opened) as f:
                        self.assertEqual(f.read(), self.server.url + "/device?user_code=WDJB-MJHT\n")
                else:
                    self.assertFalse(os.path.exists(opened))

    def test_device_codes_stay_out_of_verbose_logs(self):
        self.server.device["waits"] = 0  # approved at the first poll: waiting is tested above
        result = self.run_process("-v", "auth", "sso-login", "--url", self.server.url, "--no-browser")
        self.assertEqual(result.code, 0, result)
        self.assertIn("device_code", result.err)  # the field is logged, masked
        self.assertTrue(self.server.device_codes)
        for code in self.server.device_codes:
            self.assertNotIn(code, result.err + result.out)

    def test_login_if_needed_sso(self):
        self.server.device["waits"] = 0  # approved at the first poll: waiting is tested above
        argv = ("auth", "login", "--if-needed", "--sso", "--url", self.server.url)
        self.assertIn("Successfully logged in as zoe", self.run_process(*argv).out)
        self.server.requests.clear()
        self.assertIn("Already logged in", self.run_process(*argv).out)
        self.assertEqual([r.path for r in self.device_requests() if "oidc" in r.path], [])

    @unittest.skipUnless(POSIX, "signals")
    def test_ctrl_c_while_waiting_writes_nothing(self):
        self.seed()
        before = self.snapshot()[0]
        self.server.device.update(interval=5)
        p = self.spawn("auth", "sso-login", "--no-browser")
        while "Waiting for approval" not in p.stderr.readline():
            pass
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 130, err)
        self.assertEqual(self.snapshot()[0], before)


class IntegrationTokenTests(ResourceTestCase):
    def test_by_login_once_and_raw_for_a_script(self):
        """--identity LOGIN, --raw prints the token alone, and --if-missing makes none when the
        identity holds an active one with the label: a bootstrap run twice creates one token."""
        first = self.ok("auth", "token", "create", "--identity", "zoe", "--label", "ci", "--if-missing", "--raw",
                        secrets_ok=True).out
        self.assertRegex(first, r"^attune_it_\S+\n$")
        self.assertEqual(self.server.integration_tokens[first.strip()], "zoe")
        again = self.ok("auth", "token", "create", "--identity", "zoe", "--label", "ci", "--if-missing", "--raw")
        self.assertEqual(again.out, "")
        told = self.ok("auth", "token", "create", "--identity", "zoe", "--label", "ci", "--if-missing")
        self.assertIn("Identity 3 has an active integration token labelled 'ci' (id ", told.out)
        self.assertEqual(self.server.count("POST", "/api/v1/identities/3/integration-tokens"), 1)
        other = self.ok("auth", "token", "create", "--identity-id", "3", "--label", "deploy", "--if-missing", "-j",
                        secrets_ok=True).json()
        self.assertTrue(other["token"].startswith("attune_it_"))
        record = self.server.itoken_records[first.strip()]
        self.ok("auth", "token", "revoke", "--identity", "zoe", str(record["id"]))
        replaced = self.ok("auth", "token", "create", "--identity", "zoe", "--label", "ci", "--if-missing", "--raw",
                           secrets_ok=True).out  # the revoked one does not count
        self.assertNotEqual(replaced, first)
        self.assertIn("name the identity by --identity LOGIN or --identity-id N",
                      self.fails(2, "auth", "token", "list").err)
        self.fails(2, "auth", "token", "list", "--identity", "zoe", "--identity-id", "3")
        self.assertIn("Identity 'nobody' not found", self.fails(1, "auth", "token", "list", "--identity", "nobody").err)

    def test_create_list_use_revoke_delete(self):
        created = self.ok("auth", "token", "create", "--identity-id", "3", "--label", "ci", "--json",
                          secrets_ok=True).json()
        token, record = created["token"], created["integration_token"]
        self.assertEqual(self.sent("POST", "/api/v1/identities/3/integration-tokens").json(), {"label": "ci"})
        table = self.ok("auth", "token", "create", "--identity-id", "3", "--label", "deploy",
                        "--description", "d", "--expires-at", "2099-01-01T00:00:00Z", secrets_ok=True)
        self.assertIn("Integration token created", table.out)
        self.assertIn("Copy this token now. It will not be shown again after this response.", table.err)
        self.assertRegex(table.out, r"Token:\s+attune_it_\S+\n")
        self.assertRegex(table.out, r"Expires:\s+2099-01-01T00:00:00Z")
        listed = self.ok("auth", "token", "list", "--identity-id", "3")  # scanned: no token in it
        self.assertIn("%s...%s" % (record["token_prefix"], record["token_suffix"]), listed.out)
        self.assertEqual(listed.out.splitlines()[0].split(), ["ID", "Label", "Token", "Active", "Expires",
                                                              "Last", "Used"])
        # the new token logs in, in another profile
        self.ok("auth", "token-login", "--token-stdin", "--save-profile", "machine", "--url", self.server.url,
                stdin=token + "\n")
        revoked = self.ok("auth", "token", "revoke", "--identity-id", "3", str(record["id"]), "--reason", "leak")
        self.assertIn("Integration token revoked", revoked.out)
        self.assertEqual(self.server.requests[-1].json(), {"reason": "leak"})
        self.fails(4, "auth", "token-login", "--token-stdin", "--save-profile", "again", "--url", self.server.url,
                   stdin=token + "\n")
        self.fails(1, "auth", "token", "revoke", "--identity-id", "1", str(record["id"]))  # another identity's
        self.fails(2, "auth", "token", "delete", "--identity-id", "3", str(record["id"]))  # no terminal, no --yes
        deleted = self.ok("auth", "token", "delete", "--identity-id", "3", str(record["id"]), "--yes", "--json")
        self.assertEqual(deleted.json(), {"message": "Integration token deleted successfully"})
        # plain `auth token` still prints the session token, on the quick path and through argparse
        self.assertEqual(self.ok("auth", "token", secrets_ok=True).out, self.profile()["auth_token"] + "\n")
        self.assertEqual(self.ok("auth", "token", "-j", secrets_ok=True).json()["token"], self.profile()["auth_token"])

    def test_usage_errors(self):
        self.fails(2, "auth", "token", "create", "--label", "x")  # --identity-id is required
        self.fails(2, "auth", "token", "list", "--identity-id", "x")
        self.fails(2, "auth", "token", "frobnicate")
        self.fails(1, "auth", "token", "create", "--identity-id", "3", "--label", "x", "--expires-at",
                   "2000-01-01T00:00:00Z")
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)


class RefreshFallbackTests(AttuneTestCase):
    def expire(self, **fields):
        entry = self.seed(access_left=-100, **fields)
        self.server.revoked.add(entry["refresh_token"])  # the refresh token is dead too
        self.server.used_refresh.add(entry["refresh_token"])
        self.server.refresh_mode = "single-use"

    def test_scripts_get_the_exact_command(self):
        for method, username, command in (
                ("sso", None, "attune auth sso-login --profile default"),
                ("direct", "admin", "attune auth login --profile default -u admin"),
                ("password", "admin", "attune auth login --profile default -u admin"),  # the old name
                ("ldap", None, "attune auth login --profile default -u <username>"),
                ("token", "admin", "attune auth token-login --profile default"),
                ("something", None, "attune auth login --profile default")):
            with self.subTest(method=method):
                self.expire(auth_method=method, username=username)
                result = self.fails(4, "auth", "refresh")
                self.assertIn("Session for profile 'default' has expired; run: " + command, result.err)
                self.assertEqual(self.server.count("POST", "/auth/oidc/device/start"), 0)

    def test_on_a_terminal_sso_and_password_log_in_again(self):
        self.expire(auth_method="sso", username=None)
        with mock.patch("attune.can_prompt", return_value=True):
            result = self.ok("auth", "refresh")
        self.assertIn("Session expired. Re-initiating SSO login in your browser...", result.err)
        self.assertEqual(self.profile()["auth_method"], "sso")
        self.expire(auth_method="direct", username="admin")
        with mock.patch("attune.can_prompt", return_value=True), \
                mock.patch("getpass.getpass", return_value="s3cret-Admin-pw"):
            result = self.ok("auth", "refresh")
        self.assertIn("Session expired. Re-authenticating as 'admin'...", result.err)
        self.assertEqual(self.profile()["auth_method"], "direct")
        self.ok("auth", "whoami")


# === Tests: long sessions ====================================================
# Real processes against a server whose access tokens live 35 s (refresh margin 17 s)
# and that accepts no expired token (no leeway). The long test needs real minutes, so
# test-all runs it on one interpreter only (ATTUNE_TEST_LONG=0 on the others).

LONG_TESTS = os.environ.get("ATTUNE_TEST_LONG", "1") == "1"

# A child of `auth exec --keep-fresh`: reads $ATTUNE_TOKEN_FILE every two seconds for argv[1]
# seconds, printing when and what it read, then runs a nested attune and exits 7.
KEEP_FRESH_CHILD = ("import os, subprocess, sys, time\n"
                    "end = time.time() + float(sys.argv[1])\n"
                    "while time.time() < end:\n"
                    "    with open(os.environ['ATTUNE_TOKEN_FILE']) as f:\n"
                    "        print('%.3f %s' % (time.time(), f.read().strip()), flush=True)\n"
                    "    time.sleep(2)\n"
                    "nested = subprocess.call([sys.executable, sys.argv[2], 'auth', 'whoami'])\n"
                    "print('nested %d' % nested, flush=True)\n"
                    "sys.exit(7)\n")


class LongSessionTests(AttuneTestCase):
    server_options = {"access_ttl": 35, "leeway": 0}

    def setUp(self):
        super().setUp()
        self.seed(access_left=35, access_ttl=35)
        self.runtime = os.path.join(self.tmp, "runtime")
        os.mkdir(self.runtime, 0o700)

    def keep_fresh(self, seconds, **kwargs):
        return self.spawn("auth", "exec", "--keep-fresh", "--", sys.executable, "-c", KEEP_FRESH_CHILD,
                          str(seconds), ATTUNE_PY, env={"XDG_RUNTIME_DIR": self.runtime}, **kwargs)

    @unittest.skipUnless(LONG_TESTS, "runs on one interpreter of test-all (ATTUNE_TEST_LONG)")
    @slow
    def test_commands_that_run_for_three_token_lifetimes(self):
        """watch, logs --follow and auth exec --keep-fresh, side by side for 110 s: every
        token is renewed before it expires, none is sent expired, nothing fails."""
        eid = self.ok("run", "core.sleep", "--param", "seconds=110", "-j").json()["id"]
        watch = self.spawn("execution", "watch", str(eid), "--timeout", "300")
        logs = self.spawn("execution", "logs", str(eid), "--follow")
        child = self.keep_fresh(110)
        deadline = time.monotonic() + 60  # the list watch follows running executions: this one must be by now
        while self.server.executions[eid]["status"] != "running":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        listing = self.spawn("execution", "watch", "--status", "running", "--timeout", "300")
        results = [(p, p.communicate(timeout=240)) for p in (watch, logs, child, listing)]
        (_, (watch_out, watch_err)), (_, (logs_out, logs_err)), (_, (child_out, child_err)) = results[:3]
        self.assertEqual(watch.returncode, 0, watch_err)
        self.assertIn("completed", watch_out)
        self.assertEqual(listing.returncode, 0, results[3][1])
        self.assertTrue(results[3][1][0].endswith("All watched executions are done\n"), results[3][1])
        streams = [r.token for r in self.server.requests if r.path == "/api/v1/executions/stream"]
        self.assertGreaterEqual(len(set(streams)), 3)  # reopened with each renewed token
        self.assertEqual(logs.returncode, 0, logs_err)
        ticks = [line for line in logs_out.splitlines() if line.startswith("tick ")]
        self.assertEqual(ticks, ["tick %d" % n for n in range(1, len(ticks) + 1)])  # each once, in order
        self.assertGreaterEqual(len(ticks), 105)
        self.assertEqual(child.returncode, 7, child_err)
        reads = [line.split(" ", 1) for line in child_out.splitlines() if re.match(r"\d+\.\d{3} \S+$", line)]
        self.assertGreaterEqual(len(reads), 50)
        for when, token in reads:  # the file only ever held a token the server accepts
            self.assertIsNone(verify_jwt(token, float(when), leeway=0)[1], when)
        self.assertGreaterEqual(len({token for _, token in reads}), 3)
        self.assertIn("nested 0", child_out)
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertEqual(self.server.unauthorized, [])
        self.assertEqual(self.server.expired_sent, [])
        self.assertGreaterEqual(self.server.count("POST", "/auth/refresh"), 3)
        sockets = [ws for ws in self.server.ws_sessions if ws["filters"]]
        self.assertGreaterEqual(len(sockets), 3)  # the watch reopened its socket with each new token
        self.assertNotIn("4401", [ws["closed"] for ws in sockets])  # none was left to expire

    @unittest.skipUnless(POSIX, "signals")
    def test_keep_fresh_cleans_up_when_signalled(self):
        for victim, signum, expected in (("attune", signal.SIGTERM, 128 + signal.SIGTERM),
                                         ("child", signal.SIGKILL, 128 + signal.SIGKILL),
                                         ("attune", signal.SIGHUP, 128 + signal.SIGHUP)):
            with self.subTest(victim=victim, signal=signum):
                p = self.keep_fresh(60)
                if not p.stdout.readline():  # the child has read its token
                    self.fail(p.communicate()[1])
                self.assertEqual(len(os.listdir(self.runtime)), 1)
                directory = os.path.join(self.runtime, os.listdir(self.runtime)[0])
                self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, "token")).st_mode), 0o600)
                if victim == "attune":
                    p.send_signal(signum)  # passed on to the child, which dies of it
                else:
                    child_pid = int(subprocess.check_output(["pgrep", "-P", str(p.pid)]).split()[0])
                    os.kill(child_pid, signum)
                p.communicate(timeout=30)
                self.assertEqual(p.returncode, expected)
                self.assertEqual(os.listdir(self.runtime), [])

    @unittest.skipUnless(POSIX, "signal handlers restored")
    def test_keep_fresh_in_process(self):
        """The same loop run by main() here (for coverage): the child sees the file, its code
        comes back, signal handlers are put back and the directory is gone."""
        handler = signal.getsignal(signal.SIGTERM)
        child = "import os, sys; sys.exit(5 if open(os.environ['ATTUNE_TOKEN_FILE']).read().strip() else 6)"
        result = self.run_cli("-v", "auth", "exec", "--keep-fresh", "--", sys.executable, "-c", child,
                              env={"XDG_RUNTIME_DIR": self.runtime})
        self.assertEqual(result.code, 5, result)
        self.assertEqual(signal.getsignal(signal.SIGTERM), handler)
        self.assertEqual(os.listdir(self.runtime), [])

    def test_keep_fresh_passes_the_exit_code_and_a_missing_command(self):
        result = self.run_process("auth", "exec", "--keep-fresh", "--", sys.executable, "-c",
                                  "import os, sys; sys.exit(int(os.path.exists(os.environ['ATTUNE_TOKEN_FILE'])) + 2)",
                                  env={"XDG_RUNTIME_DIR": self.runtime})
        self.assertEqual(result.code, 3, result)
        result = self.run_process("auth", "exec", "--keep-fresh", "--", "no-such-command-here",
                                  env={"XDG_RUNTIME_DIR": self.runtime})
        self.assertEqual(result.code, 127, result)
        self.assertEqual(os.listdir(self.runtime), [])

    @unittest.skipUnless(POSIX, "flock")
    def test_a_refresh_waiting_for_the_lock_never_undoes_a_logout(self):
        """Hold the lock; start a command whose token is due; when it waits for the lock,
        log out (as logout, logout --all or remove-profile write it) and let go: the command
        must stop with exit 4 and leave the profile logged out."""
        import fcntl

        def logout(doc):
            for key in attune.TOKEN_KEYS:
                doc["profiles"]["default"].pop(key, None)

        def logout_all(doc):
            for profile in doc["profiles"].values():
                for key in attune.TOKEN_KEYS:
                    profile.pop(key, None)

        def remove_profile(doc):
            del doc["profiles"]["default"]

        for name, change in (("logout", logout), ("logout --all", logout_all), ("remove-profile", remove_profile)):
            with self.subTest(name):
                self.seed(access_left=10, access_ttl=35)  # due: the command refreshes before its request
                self.seed("other")
                self.write_doc(dict(self.read_doc(), current_profile="default"))
                lock = open(self.config + ".lock", "a+")
                fcntl.flock(lock, fcntl.LOCK_EX)
                p = self.spawn("-v", "-p", "default", "pack", "list")
                seen = ""
                while "refreshing" not in seen:
                    line = p.stderr.readline()
                    self.assertTrue(line, seen)
                    seen += line
                time.sleep(0.3)  # it is now waiting for the lock
                doc = self.read_doc()
                change(doc)
                self.write_doc(doc)
                after = self.snapshot()[0]
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()
                out, err = p.communicate(timeout=60)
                self.assertEqual(p.returncode, 4, err)
                self.assertEqual(self.snapshot()[0], after)  # nothing came back
                self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    def test_a_failed_refresh_is_tried_again_while_the_token_lives(self):
        """A proactive refresh that fails (503) keeps the old token and is not retried on every
        call, but again later, halfway to the last 30 s; then it succeeds."""
        self.seed(access_left=200, access_ttl=1200)  # margin 120 s
        now = [time.time()]
        session = session_for(self)
        session.now = lambda: now[0]
        self.server.fail("/auth/refresh", status=503, body={"error": "busy", "code": "UNAVAILABLE"}, times=None)
        now[0] += 100  # 100 s left: due
        first = session.token()
        self.assertEqual(self.refreshes(), 1)
        now[0] += 1
        self.assertEqual(session.token(), first)  # a moment later: no new attempt
        self.assertEqual(self.refreshes(), 1)
        now[0] += 35  # 64 s left, past the retry time: tried again, failing again
        self.assertEqual(session.token(), first)
        self.assertEqual(self.refreshes(), 2)
        self.server.faults.clear()
        now[0] += 18  # 46 s left, past the next retry time: this attempt succeeds
        self.assertNotEqual(session.token(), first)
        self.assertEqual(self.refreshes(), 3)

    def refreshes(self):
        return self.server.count("POST", "/auth/refresh")

    def test_each_token_is_refreshed_once_before_expiry_and_once_after_a_401(self):
        """In one run, with a clock that moves: a refresh for each token that nears its
        expiry, and a second 401 with the same token is exit 4."""
        self.server.refresh_mode = "single-use"  # every token distinct, even within a second
        self.seed(access_left=35, access_ttl=35)
        now = [time.time()]
        session = session_for(self)
        session.now = lambda: now[0]
        session.token()
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)
        for step in range(1, 5):
            now[0] += 20  # each token is due 18 s after it was issued
            token = session.token()
            self.assertEqual(self.server.count("POST", "/auth/refresh"), step)
            self.assertEqual(self.profile()["auth_token"], token)
        self.assertEqual(session.token(), token)  # not due again: no request
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 4)
        # a 401: one refresh and a retry for this token; the same token rejected again is exit 4
        self.server.revoked.add(token)
        session.request("GET", "/packs").check()
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 5)
        self.server.revoked.add(session.creds.access)  # the new token is rejected: a refresh for it too
        session.request("GET", "/packs").check()
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 6)
        self.server.revoked.update(self.server.issued)  # and the refresh hands out a revoked token:
        self.server.mint = lambda *a, **k: self.server.issued[0]  # the retry's 401 is exit 4
        with self.assertRaises(attune.AuthError):
            session.request("GET", "/packs")


# === Tests: bounds ===========================================================
# Every wait ends at its deadline, every answer read into memory has a size bound, and a
# request that may have reached the server is sent once. Tables of commands x faults from
# the fake server (a dribbling answer, an endless body, a gateway that fails after the
# work was done, oversized headers and events, a slow WebSocket upgrade).

def peak_rss_mb(test, argv, env=None):
    """Run attune as a process; (exit code, stderr, its peak resident memory in MB)."""
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(attune_argv() + list(argv), env=test.process_env(env), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else \
        (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
    err.seek(0)
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return p.returncode, err.read(), usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


class BoundsTests(ResourceTestCase):
    GETS = [(("pack", "list"), "/api/v1/packs"), (("pack", "show", "core"), "/api/v1/packs/core"),
            (("action", "list"), "/api/v1/actions"), (("execution", "list"), "/api/v1/executions"),
            (("key", "list"), "/api/v1/keys"), (("auth", "whoami"), "/auth/me"),
            (("rule", "show", "examples.on_timer"), "/api/v1/rules/examples.on_timer"),
            (("api", "GET", "/packs"), "/api/v1/packs"), (("health",), "/health"),
            (("queue", "list"), "/api/v1/queues"), (("identity", "list"), "/api/v1/identities")]
    POSTS = [(("run", "core.echo", "--param", "message=x"), "/api/v1/executions/execute"),
             (("action", "execute", "core.echo", "--param", "message=x"), "/api/v1/executions/execute"),
             (("api", "POST", "/executions/execute", "--data", '{"action_ref": "core.echo"}'),
              "/api/v1/executions/execute"),
             (("rule", "enable", "examples.on_timer"), "/api/v1/rules/examples.on_timer/enable")]

    def check_error(self, result, code, needle):
        """The exit code, one error line (the last) saying needle, no traceback."""
        self.assertEqual(result.code, code, result)
        self.assertNotIn("Traceback", result.out + result.err)
        lines = result.err.splitlines()
        self.assertEqual(len([line for line in lines if line.startswith("attune: error: ")]), 1, result)
        self.assertIn(needle, lines[-1], result)

    def test_a_dribbling_answer_ends_at_the_request_deadline(self):
        """ATTUNE_TIMEOUT bounds a request from connect to the last byte: an answer sent a
        byte every 0.2 s (a minute for this one) fails at 0.5 s, and is not sent again."""
        body = {"data": [], "pagination": {"page": 1, "page_size": 50, "total_items": 0, "total_pages": 1,
                                           "has_next": False}, "padding": "x" * 200}
        for argv, path in sampled(self.GETS + self.POSTS):
            with self.subTest(argv=argv):
                self.server.requests.clear()
                self.server.fail(path, dribble=0.2, body=body, times=None)
                started = time.monotonic()
                result = self.run_cli(*argv, env={"ATTUNE_TIMEOUT": "0.5"})
                self.server.faults.clear()
                self.check_error(result, 5, "within 0.5s")
                self.assertLess(time.monotonic() - started, 20)  # a hang guard: the answer takes 60 s
                self.wait_until(lambda: self.server.requests)  # a loaded server thread logs it late
                self.assertEqual([r.path for r in self.server.requests], [path])

    def test_the_request_deadline_holds_in_any_thread(self):
        """The deadline lives in the socket, not in a signal: the same dribbling answer ends
        at 0.5 s when attune.main runs in another thread (as on Windows, where no timer
        signal exists)."""
        import threading
        self.server.fail("/api/v1/packs", dribble=0.2, body={"data": [], "padding": "x" * 300}, times=None)
        results = []
        worker = threading.Thread(target=lambda: results.append(
            self.run_cli("pack", "list", env={"ATTUNE_TIMEOUT": "0.5"})))
        worker.start()
        worker.join(60)  # a hang guard: the answer takes a minute
        self.server.faults.clear()
        self.assertFalse(worker.is_alive())
        self.check_error(results[0], 5, "within 0.5s")

    def test_a_deadline_socket_step_by_step(self):
        """Each step may take what is left of the deadline (at most `step`); once it has
        passed every step is a timeout; lifted, only `step` bounds each read."""
        import socket
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        deadline = attune.RequestDeadline(30, 7)
        sock = attune.DeadlineSocket(ours, deadline)
        theirs.sendall(b"abcd")
        self.assertEqual(sock.recv(2), b"ab")
        self.assertEqual(ours.gettimeout(), 7)  # the step: less than what is left
        reader = sock.makefile("rb")
        self.assertEqual(reader.read(2), b"cd")
        theirs.sendall(b"ef")
        deadline.at = time.monotonic() - 1  # the deadline has passed
        for step in (lambda: sock.recv(1), lambda: sock.sendall(b"x"), lambda: reader.read(2)):
            with self.assertRaises(socket.timeout):
                step()
        deadline.lift()  # a stream's body: no overall deadline any more
        self.assertEqual(reader.read(2), b"ef")
        sock.sendall(b"ok")
        self.assertEqual(theirs.recv(2), b"ok")
        deadline.at = time.monotonic() + 0.25
        self.assertLessEqual(deadline.left(), 0.25)  # what is left, when less than the step
        reader.close()
        sock.close()
        self.assertEqual(ours.fileno(), -1)  # closed once both are

    @unittest.skipUnless(hasattr(os, "wait4"), "peak memory of a child")
    def test_an_endless_answer_stops_at_its_size_bound(self):
        for argv, path in ((("pack", "list"), "/api/v1/packs"), (("auth", "whoami"), "/auth/me")):
            with self.subTest(argv=argv):
                self.server.fail(path, endless=True)
                code, err, peak = peak_rss_mb(self, argv)
                self.assertEqual(code, 6, err)
                self.assertIn("is larger than 32 MiB, the most attune.py reads into memory", err)
                self.assertNotIn("Traceback", err)
                self.assertLess(peak, 400)  # the body is 1 GiB (measured: 64 MB on CPython, 300 on PyPy)
        self.server.fail("/api/v1/packs/nope", endless=True, status=404)
        self.check_error(self.run_cli("pack", "show", "nope"), 6, "(an error) is larger than 1 MiB")

    def test_a_request_that_may_have_been_done_is_sent_once(self):
        """A gateway's 502/503/504 or a reset after the server did the work: a POST is sent
        once and the work happened once, with or without --wait-for-server; a GET is retried."""
        cases = [(argv, path, fault, wait) for argv, path in self.POSTS
                 for fault in ({"status": 502}, {"status": 503}, {"status": 504}, {"status": 200, "truncate": True})
                 for wait in ([], ["--wait-for-server", "20"])]
        for argv, path, fault, wait in sampled(cases):
            with self.subTest(argv=argv, fault=fault, wait=wait):
                self.server.requests.clear()
                before = len(self.server.executions)
                self.server.fail(path, processed=True, times=None, body={"error": "bad gateway", "code": "X"},
                                 **fault)
                result = self.run_cli(*(wait + list(argv)))
                self.server.faults.clear()
                self.check_error(result, 5 if fault.get("truncate") else 6,
                                 "closed unexpectedly" if fault.get("truncate") else "%d " % fault["status"])
                self.assertEqual([r.path for r in self.server.requests if r.path != "/health"], [path])
                if "execute" in path:
                    self.assertEqual(len(self.server.executions), before + 1)
        self.server.requests.clear()
        self.server.fail("/api/v1/packs", status=503, times=2, body={"error": "busy", "code": "X"})
        self.ok("pack", "list")
        self.assertEqual(self.server.count("GET", "/api/v1/packs"), 3)

    def test_oversized_headers_and_events_are_server_errors(self):
        self.server.fail("/api/v1/packs", status=200, body={"data": []}, headers={"X-Big": "y" * 70000})
        self.check_error(self.run_cli("pack", "list"), 6, "more headers than http.client reads")
        self.server.fail("/api/v1/packs", status=200, body={"data": []},
                         headers={"X-H%d" % i: "v" for i in range(120)})
        self.check_error(self.run_cli("pack", "list"), 6, "more headers than http.client reads")
        self.execute("core.sleep")
        self.server.stream_faults.append("x" * (5 << 20))
        self.check_error(self.run_cli("execution", "watch", "--timeout", "30"), 6,
                         "an event of the server's stream is larger than 4 MiB")

    def test_dates_a_server_sends_go_through_one_checked_parser(self):
        for date in ("Mon, 01 Jan 99999 00:00:00 GMT", "garbage", "Tue, 31 Feb 2026 25:61:61 GMT", "x" * 500,
                     "Thu, 01 Jan 1970 00:00:00 -9999", "Sat, 01 Jan 10000 00:00:00 GMT", "\x1b[2J"):
            with self.subTest(date=date):
                self.server.fail("/health", status=200, body={"status": "ok"}, headers={"Date": date})
                result = self.run_cli("auth", "doctor", "-j")
                self.assertNotIn("Traceback", result.err)
                self.assertNotIn("clock_skew_seconds", json.loads(result.out)["server"])

    @unittest.skipUnless(POSIX, "a deleted working directory")
    def test_a_relative_config_in_a_deleted_directory(self):
        gone = os.path.join(self.tmp, "gone")
        os.mkdir(gone)
        p = self.spawn("--config", "creds.json", "auth", "token", script=True,
                       preexec_fn=lambda: (os.chdir(gone), os.rmdir(gone)))
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 3, err)
        self.assertIn("the working directory is gone", err)
        self.assertNotIn("Traceback", err)

    @unittest.skipUnless(POSIX, "fcntl")
    def test_a_commands_timeout_caps_the_lock_and_every_request(self):
        """execution watch --timeout 3 whose token is due while another process holds the
        lock (ATTUNE_LOCK_TIMEOUT is 30 s), or whose server answers in 20 s (ATTUNE_TIMEOUT
        60 s): it ends at its own deadline."""
        eid = self.execute("core.sleep")
        LockTests.hold_lock(self, 60)
        self.seed(access_left=-100)  # due: the watch refreshes, and waits for the lock
        started = time.monotonic()
        result = self.run_cli("execution", "watch", str(eid), "--timeout", "3")
        self.assertEqual(result.code, 1, result)
        self.assertIn("gave up waiting", result.err)
        self.assertLess(time.monotonic() - started, 20)  # the lock alone would take 30 s
        self.seed()
        self.server.fail("/api/v1/executions/%d" % eid, delay=20, times=None)
        started = time.monotonic()
        result = self.run_cli("execution", "watch", str(eid), "--timeout", "3")
        self.assertEqual(result.code, 1, result)  # the watch's --timeout, not a network error (5)
        self.assertIn("timed out after 3s waiting for execution %d (the server had not answered in the time left)"
                      % eid, result.err)
        self.assertLess(time.monotonic() - started, 15)  # one answer alone takes 20 s

    def test_health_wait_and_the_pack_test_wait_cap_their_requests(self):
        """health --wait 1 and the wait for a pack's tests end at their own deadline when
        the server takes 30 s to answer (ATTUNE_TIMEOUT is 60 s)."""
        self.server.fail("/health", delay=30, times=None)
        started = time.monotonic()
        self.check_error(self.run_cli("health", "--wait", "1"), 5, "within")
        self.assertLess(time.monotonic() - started, 20)  # a hang guard: one answer takes 30 s
        self.server.faults.clear()
        self.server.install_tests = "succeeded"
        self.server.fail(re.compile(r"/api/v1/packs/install/\d+"), delay=30, times=None)
        started = time.monotonic()
        with mock.patch.object(attune, "INSTALL_WAIT", 1):
            result = self.run_cli("pack", "install", "slack")
        self.assertLess(time.monotonic() - started, 20)
        self.server.faults.clear()
        self.assertEqual(result.code, 0, result)  # the pack is installed; its tests still run
        self.assertIn("Timed out waiting for pack tests to complete", result.err)

    def test_a_slow_websocket_upgrade_ends_within_the_watch_timeout(self):
        """The notifier answers its upgrade a byte every 0.3 s: the watch gives up on it,
        polls, and ends at its own --timeout."""
        eid = self.execute("core.sleep")
        self.server.fail("/ws", status=101, dribble=0.3, body=b"", times=None,
                         headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        started = time.monotonic()
        result = self.run_cli("-v", "execution", "watch", str(eid), "--timeout", "3")
        self.assertEqual(result.code, 1, result)
        self.assertIn("timed out after 3s", result.err)
        self.assertLess(time.monotonic() - started, 20)  # a hang guard: the upgrade answer takes a minute
        self.assertTrue(any(r.path == "/api/v1/executions/%d" % eid for r in self.server.requests))


class OriginTests(ResourceTestCase):
    """A profile's stored tokens go only to the origin it logged in to; environment tokens
    go where the user points them; nothing another origin answers changes the profile."""

    def setUp(self):
        super().setUp()
        self.foreign = FakeAttune().start()
        self.addCleanup(self.foreign.stop)

    COMMANDS = [("pack", "list"), ("auth", "whoami"), ("auth", "token"), ("auth", "refresh"),
                ("execution", "list"), ("api", "GET", "/packs"), ("key", "list"), ("auth", "status")]

    def test_another_origin_gets_no_stored_session(self):
        self.seed(access_left=-100)  # due: a refresh would be sent too, were the tokens sent
        before = self.snapshot()[0]
        other = self.foreign.url
        cases = [(argv, how) for argv in self.COMMANDS for how in ("flag", "env")]
        for argv, how in cases:
            with self.subTest(argv=argv, how=how):
                if how == "flag":
                    result = self.run_cli("--api-url", other, *argv)
                else:
                    result = self.run_cli(*argv, env={"ATTUNE_API_URL": other})
                self.assertEqual(result.code, 4, result)
                self.assertNotIn("Traceback", result.err)
                if argv != ("auth", "status"):  # status reports on stdout
                    self.assertIn("profile 'default' is logged in to %s, and its tokens are sent nowhere "
                                  "else; for %s run: attune auth login --url %s" % (self.server.url, other, other),
                                  result.err)
        self.assertEqual(self.foreign.received, set())  # no token of ours ever reached it
        self.assertEqual(self.foreign.count("POST", "/auth/refresh"), 0)
        self.assertEqual(self.server.count(), 0)
        self.assertEqual(self.snapshot()[0], before)
        self.ok("pack", "list")  # the real session is fine

    def test_a_profile_without_a_usable_url_of_its_own_sends_its_tokens_nowhere(self):
        """The profile's own URL is worked out in one place: an entry without a usable api_url
        has no origin, so --api-url (even the default URL's) gets no stored session."""
        for broken in (None, 42, "ftp://x"):
            with self.subTest(api_url=broken):
                self.seed()
                doc = self.read_doc()
                doc["profiles"]["default"].pop("api_url")
                if broken is not None:
                    doc["profiles"]["default"]["api_url"] = broken
                self.write_doc(doc)
                result = self.fails(4, "--api-url", self.server.url, "pack", "list")
                self.assertIn("profile 'default' is logged in to (no usable api_url), and its tokens are sent "
                              "nowhere else", result.err)
                self.assertEqual(self.server.received, set())
                self.fails(3, "pack", "list")  # without --api-url the entry itself is the problem

    def test_the_same_origin_written_differently_is_the_same(self):
        token = self.seed()["auth_token"]
        host, port = "127.0.0.1", self.server.port
        for url in ("http://%s:%d/" % (host, port), "HTTP://%s:%d" % (host, port), " http://%s:%d/ " % (host, port)):
            with self.subTest(url=url):
                self.server.requests.clear()
                self.ok("--api-url", url, "pack", "list")
                self.assertEqual([r.token for r in self.server.requests], [token])

    def test_environment_tokens_go_where_they_are_pointed(self):
        self.seed()
        token = self.foreign.mint("admin", "access")
        self.ok("--api-url", self.foreign.url, "pack", "list", env={"ATTUNE_API_TOKEN": token})
        self.assertEqual([r.token for r in self.foreign.requests], [token])

    def test_a_foreign_401_never_touches_the_profile(self):
        """A stored profile pointed elsewhere by a stray ATTUNE_API_URL: nothing is sent, so
        nothing can come back and mark it invalidated."""
        self.seed()
        before = self.snapshot()[0]
        self.foreign.fail("/api/v1/packs", status=401, times=None, body={"error": "Unauthorized"})
        self.fails(4, "pack", "list", env={"ATTUNE_API_URL": self.foreign.url})
        self.assertEqual(self.snapshot()[0], before)
        self.assertIsNone(self.profile()["invalidated_at"])

    def test_pointing_a_profile_elsewhere_drops_its_session(self):
        self.seed()
        for argv in (("config", "set", "api_url", self.foreign.url),
                     ("config", "add-profile", "default", "--api-url", self.foreign.url)):
            with self.subTest(argv=argv):
                self.seed()
                result = self.ok(*argv)
                self.assertIn("its session for %s is dropped" % self.server.url, result.err)
                self.assertFalse(set(attune.TOKEN_KEYS) & set(self.profile()), self.profile())
                self.fails(4, "pack", "list")
                self.assertEqual(self.foreign.received, set())
        self.seed()
        self.ok("config", "set", "api_url", self.server.url + "/")  # the same origin: the session stays
        self.assertIn("auth_token", self.profile())

    def test_malformed_redirects_are_refused_in_one_line(self):
        for location in ("http://[::1", "http://127.0.0.1:99999/x", "http://h:abc/", "http://[zz", "ftp://x/",
                         "javascript:alert(1)", "http://a b/", "http://%s:%d\x1b[2J/" % (
                             "127.0.0.1", self.server.port)):
            with self.subTest(location=location):
                self.server.fail("/api/v1/packs", status=302, headers={"Location": location}, body=None)
                result = self.fails(1, "pack", "list")
                self.assertIn("refusing to follow a redirect", result.err)
                self.assertEqual(len(result.err.splitlines()), 1, result)
                self.assertEqual(raw_controls(result.err), [])
                self.server.faults.clear()


class SecretTests(ResourceTestCase):
    """Every secret the process knows is masked in every output, whatever carries it."""
    ECHOES = [("flat error", 400, lambda sent: {"error": "you sent " + sent, "code": "BAD"}),
              ("nested error", 422, lambda sent: {"error": {"code": 422, "message": "you sent " + sent}}),
              ("HTML", 502, lambda sent: "<html><pre>%s</pre></html>" % sent),
              ("a field", 200, lambda sent: {"data": [{"ref": "x", "label": "L", "version": "1",
                                                        "description": "you sent " + sent}]})]
    COMMANDS = [(("auth", "login", "-u", "admin", "--password-stdin"), "/auth/login", PASSWORD + "\n"),
                (("-v", "auth", "login", "-u", "admin", "--password-stdin"), "/auth/login", PASSWORD + "\n"),
                (("pack", "list"), "/api/v1/packs", ""), (("-v", "pack", "list", "-j"), "/api/v1/packs", ""),
                (("pack", "list", "-y"), "/api/v1/packs", ""), (("api", "GET", "/packs"), "/api/v1/packs", ""),
                (("run", "core.echo", "--param", "message=x"), "/api/v1/executions/execute", "")]

    def test_a_server_that_echoes_what_it_was_sent(self):
        token = self.profile()["auth_token"]
        for (label, status, echo), (argv, path, stdin) in sampled(
                [(e, c) for e in self.ECHOES for c in self.COMMANDS]):
            with self.subTest(echo=label, argv=argv):
                self.server.fail(path, status=status, echo=echo)
                result = self.run_cli(*argv, stdin=stdin)  # scans every output for every secret
                self.server.faults.clear()
                printed = result.out + result.err
                self.assertNotIn(token[-20:], printed)  # not even a cut piece of it
                self.assertNotIn(PASSWORD, printed)
                if "you sent" in printed and status >= 400:  # the echo was shown: with its secrets masked
                    self.assertIn("***", printed, result)

    def test_secrets_in_logs_and_documents_whatever_the_field(self):
        token = self.profile()["auth_token"]
        eid = self.execute("core.echo", "message=the token is " + token)
        for argv in (("execution", "logs", str(eid), "--follow"), ("execution", "show", str(eid), "-j"),
                     ("execution", "show", str(eid), "-y"), ("execution", "show", str(eid))):
            with self.subTest(argv=argv):
                result = self.ok(*argv)
                self.assertIn("the token is ***", result.out)
        self.assertEqual(self.ok("auth", "token", secrets_ok=True).out, token + "\n")  # the exception
        self.assertEqual(self.ok("auth", "token", "-j", secrets_ok=True).json()["token"], token)

    @unittest.skipUnless(POSIX, "exec")
    def test_auth_exec_hands_on_no_other_credential(self):
        child = ("import os\n"
                 "for name in ('ATTUNE_API_TOKEN', 'ATTUNE_REFRESH_TOKEN', 'ATTUNE_PASSWORD', 'ATTUNE_AUTH_TOKEN'):\n"
                 "    print(name, 'set' if os.environ.get(name) else 'unset')\n")
        env = {"ATTUNE_API_TOKEN": self.profile()["auth_token"], "ATTUNE_REFRESH_TOKEN": self.profile()["refresh_token"],
               "ATTUNE_PASSWORD": PASSWORD, "ATTUNE_AUTH_TOKEN": "x" * 20}
        result = self.run_process("auth", "exec", "--", sys.executable, "-c", child, env=env)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.out.split("\n")[:4], ["ATTUNE_API_TOKEN set", "ATTUNE_REFRESH_TOKEN unset",
                                                      "ATTUNE_PASSWORD unset", "ATTUNE_AUTH_TOKEN unset"])


@unittest.skipUnless(POSIX, "signals")
class ExitSignalTests(ResourceTestCase):
    """SIGTERM and SIGHUP clean up as Ctrl+C does: no temp file, the lock released, the old
    file kept; the exit code is 128 + the signal."""

    def test_a_download_stopped_by_a_signal_leaves_nothing(self):
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)):
            with self.subTest(signal=signum):
                folder = tempfile.mkdtemp(dir=self.tmp)
                self.server.fail("/api/v1/artifacts/1/download", slow_body=0.05, body=b"x" * 100000)
                p = self.spawn("artifact", "download", "1", "-o", os.path.join(folder, "out.bin"))
                deadline = time.monotonic() + 60
                while not os.listdir(folder):  # the temp file: the download has begun
                    self.assertLess(time.monotonic(), deadline, "the download never started")
                    time.sleep(0.01)
                p.send_signal(signum)
                out, err = p.communicate(timeout=60)
                self.assertEqual(p.returncode, code, err)
                self.assertNotIn("Traceback", err)
                self.assertEqual(os.listdir(folder), [])
                self.server.faults.clear()

    def interrupt_on_create(self, create, name_part):
        """os.open / os.mkdir that creates what it is asked and then, for a path containing
        name_part, raises KeyboardInterrupt: a signal landing the instant the file exists."""
        created = []

        def wrapper(path, *args, **kwargs):
            result = create(path, *args, **kwargs)
            if name_part in os.path.basename(path):
                created.append(result)
                raise KeyboardInterrupt
            return result
        return wrapper, created

    def test_an_interrupt_the_instant_a_temp_file_exists_leaves_nothing(self):
        folder = tempfile.mkdtemp(dir=self.tmp)
        target = os.path.join(folder, "out.bin")
        self.server.fail("/api/v1/artifacts/1/download", status=200, body=b"data")
        wrapper, created = self.interrupt_on_create(os.open, ".out.bin.")
        with mock.patch.object(os, "open", wrapper):
            result = self.run_cli("artifact", "download", "1", "-o", target)
        for fd in created:
            os.close(fd)
        self.assertEqual(len(created), 1)
        self.assertEqual(result.code, 130, result)
        self.assertEqual(os.listdir(folder), [])

    def test_a_temp_name_already_taken_is_left_to_its_owner(self):
        folder = tempfile.mkdtemp(dir=self.tmp)
        target, theirs = os.path.join(folder, "out.bin"), os.path.join(folder, ".out.bin.theirs.tmp")
        with open(theirs, "w") as f:
            f.write("another writer's\n")
        ours = os.path.join(folder, ".out.bin.ours.tmp")
        with mock.patch.object(attune, "fresh_name", side_effect=[theirs, ours]):
            attune.write_atomic(target, b"new\n")
        self.assertEqual(sorted(os.listdir(folder)), [".out.bin.theirs.tmp", "out.bin"])
        with open(theirs) as f:
            self.assertEqual(f.read(), "another writer's\n")
        with open(target) as f:
            self.assertEqual(f.read(), "new\n")

    @unittest.skipUnless(POSIX, "auth exec --keep-fresh")
    def test_an_interrupt_the_instant_the_token_directory_exists_leaves_nothing(self):
        runtime = tempfile.mkdtemp(dir=self.tmp)
        wrapper, created = self.interrupt_on_create(os.mkdir, "attune-exec-")
        with mock.patch.object(os, "mkdir", wrapper):
            result = self.run_cli("auth", "exec", "--keep-fresh", "--", sys.executable, "-c", "pass",
                                  env={"XDG_RUNTIME_DIR": runtime})
        self.assertEqual(len(created), 1)
        self.assertEqual(result.code, 130, result)
        self.assertEqual(os.listdir(runtime), [])

    def test_a_refresh_stopped_by_a_signal_releases_the_lock(self):
        import fcntl
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            with self.subTest(signal=signum):
                self.seed(access_left=-100)
                before = self.snapshot()[0]
                self.server.requests.clear()
                self.server.fail("/auth/refresh", delay=30)
                p = self.spawn("auth", "whoami")
                deadline = time.monotonic() + 60
                while self.server.count("POST", "/auth/refresh") == 0:  # it holds the lock now
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.01)
                p.send_signal(signum)
                out, err = p.communicate(timeout=60)
                self.assertEqual(p.returncode, code, err)
                self.assertIn("terminated" if signum == signal.SIGTERM else "hung up", err)
                with open(self.config + ".lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
                self.assertEqual(self.snapshot()[0], before)
                self.server.faults.clear()

    def test_an_ignored_hangup_stays_ignored(self):
        """nohup: a SIGHUP the parent ignores does not stop attune.py."""
        self.server.fail("/api/v1/packs", delay=1.5)
        p = self.spawn("pack", "list", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        deadline = time.monotonic() + 60
        while self.server.count("GET", "/api/v1/packs") == 0:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        p.send_signal(signal.SIGHUP)
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("core", out)


@unittest.skipUnless(POSIX and os.path.exists("/dev/full"), "closed descriptors and /dev/full")
class StandardStreamTests(ResourceTestCase):
    """Closed, full or broken standard streams: a documented exit code, one error line
    where there is a stderr to say it, never a traceback; a command whose only trouble is
    its stderr succeeds."""
    STDOUT_COMMANDS = [("pack", "list"), ("pack", "list", "-j"), ("auth", "token"), ("--version",), ("--help",),
                       ("auth", "whoami", "-y")]

    def run_with(self, argv, stdout="pipe", stderr="pipe", stdin="null"):
        """argv as a process whose streams are 'pipe', 'null', 'full' (/dev/full) or 'closed'."""
        opened = []

        def target(kind, mode):
            if kind == "pipe":
                return subprocess.PIPE
            if kind == "closed":
                return None
            f = open({"null": os.devnull, "full": "/dev/full"}[kind], mode)
            opened.append(f)
            return f

        closed = [fd for fd, kind in ((0, stdin), (1, stdout), (2, stderr)) if kind == "closed"]
        p = subprocess.Popen(attune_argv() + list(argv), env=self.process_env(), stdin=target(stdin, "rb"),
                             stdout=target(stdout, "wb"), stderr=target(stderr, "wb"),
                             preexec_fn=lambda: [os.close(fd) for fd in closed])
        out, err = p.communicate(timeout=60)
        for f in opened:
            f.close()
        return p.returncode, (out or b"").decode("utf-8", "replace"), (err or b"").decode("utf-8", "replace")

    def test_stdout_closed_or_full(self):
        for argv in self.STDOUT_COMMANDS:
            for state, message in (("closed", "standard output is closed"), ("full", "No space left on device")):
                with self.subTest(argv=argv, stdout=state):
                    code, _, err = self.run_with(argv, stdout=state)
                    self.assertEqual(code, 1, err)
                    self.assertEqual(err, "attune: error: cannot write the output: %s\n" % message)

    def test_stderr_closed_or_full_is_no_failure(self):
        for argv in (("pack", "list"), ("--version",), ("auth", "whoami"), ("-v", "pack", "list")):
            for state in ("closed", "full"):
                with self.subTest(argv=argv, stderr=state):
                    code, out, _ = self.run_with(argv, stderr=state)
                    self.assertEqual(code, 0)
                    self.assertTrue(out)
        code, out, _ = self.run_with(("pack", "show", "nope"), stderr="closed")  # a failure stays one
        self.assertEqual((code, out), (1, ""))
        code, out, err = self.run_with(("pack", "list"), stdout="closed", stderr="closed")
        self.assertEqual((code, out, err), (1, "", ""))

    def test_stdin_closed(self):
        code, _, err = self.run_with(("auth", "login", "-u", "admin", "--password-stdin"), stdin="closed")
        self.assertEqual(code, 2, err)
        self.assertEqual(err, "attune: error: no password on standard input\n")


@unittest.skipUnless(POSIX, "symbolic links and FIFOs")
class UpdateCommandTests(ResourceTestCase):
    """Every `X update REF` given no field: exit 2 before any request is sent."""

    def test_an_update_with_nothing_to_change_sends_nothing(self):
        attune.load_rest()
        updates = [c.path for c in attune.COMMANDS if c.path[-1] == "update" and len(c.path) == 2]
        self.assertGreaterEqual(len(updates), 7)
        refs = {"queue": "core.inbox", "key": "mykey", "policy": "core.limit", "rule": "examples.on_timer"}
        for path in updates:
            with self.subTest(path):
                self.server.requests.clear()
                result = self.run_cli(*(list(path) + [refs.get(path[0], "core.x")]), stdin="")
                self.assertEqual(result.code, 2, result)
                self.assertIn("At least one field must be provided to update", result.err)
                self.assertEqual([r.path for r in self.server.requests if not r.path.startswith("/auth")], [])


class LinkTests(ResourceTestCase):
    """Where attune.py writes, a symbolic link or a non-regular file is refused (exit 3),
    never written through and never replaced silently; what it points to stays as it was."""

    def plant(self, path, kind):
        """A link (to a victim file, or dangling) or a FIFO at path; the victim's path."""
        victim = os.path.join(self.tmp, "victim-%s" % kind)
        if kind == "link":
            with open(victim, "w") as f:
                f.write("precious\\n")
        if kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(victim, path)
        return victim

    def check_victim(self, victim, kind):
        if kind == "link":
            with open(victim) as f:
                self.assertEqual(f.read(), "precious\\n")
        else:
            self.assertFalse(os.path.exists(victim))

    def test_the_lock_file(self):
        for kind in ("link", "dangling", "fifo"):
            with self.subTest(kind=kind):
                lock = self.config + ".lock"
                if os.path.lexists(lock):
                    os.unlink(lock)
                victim = self.plant(lock, kind)
                before = self.snapshot()[0]
                result = self.fails(3, "config", "set", "description", "x")
                self.assertIn("the lock file", result.err)
                self.check_victim(victim, kind)
                self.assertEqual(self.snapshot()[0], before)
                os.unlink(lock)

    def test_downloads_and_completion_scripts(self):
        home = os.path.join(self.tmp, "home")
        target = os.path.join(home, ".local", "share", "bash-completion", "completions", "attune")
        os.makedirs(os.path.dirname(target))
        for kind in ("link", "dangling"):
            with self.subTest(kind=kind, what="download"):
                out = os.path.join(self.tmp, "out-%s" % kind)
                victim = self.plant(out, kind)
                result = self.fails(2 if kind == "link" else 3, "artifact", "download", "1", "-o", out)
                self.assertIn("exists; add --force" if kind == "link" else "is a symbolic link", result.err)
                self.check_victim(victim, kind)
                self.ok("artifact", "download", "1", "-o", out, "--force")  # replaces the link itself
                self.assertFalse(os.path.islink(out))
                self.check_victim(victim, kind)
            with self.subTest(kind=kind, what="completion install"):
                victim = self.plant(target, kind)
                result = self.fails(3, "completion", "install", "bash", env={"XDG_DATA_HOME": None})
                self.assertIn("is a symbolic link", result.err)
                self.check_victim(victim, kind)
                os.unlink(target)


# === Tests: untrusted input ==================================================
# Tables of hostile values, generated per kind of input and crossed with the commands
# that read it, each run through attune.main. Every run must end with a documented exit
# code, one short error line, no traceback, nothing on stdout for a failure, no secret
# and no raw control character anywhere, the credential file as it was, in bounded time.

CONTROL_SAMPLES = ["\x1b[2J", "\x1b]52;c;aGVsbG8=\x07", "\x1b]0;owned\x07", "\x9b31m", "\x07", "\r", "\x08",
                   "\x7f", "\u202e", "\x85", "\x00"]


def hostile_strings(rng, alphabet, count, length=12):
    """count random strings over alphabet, each holding at least one of its characters."""
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, length))) for _ in range(count)]


def new_file_mode():
    """The mode a new file gets under this process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def sampled(cases):
    """The cases this run takes: all of them, or under test-all (ATTUNE_TEST_SAMPLE=k/n)
    every n-th from the k-th, so that the nine interpreters share each table and every
    case still runs on several of them (and all of them in `make test`)."""
    k, _, n = os.environ.get("ATTUNE_TEST_SAMPLE", "0/1").partition("/")
    return [case for i, case in enumerate(cases) if i % int(n) == int(k)]


def raw_controls(text):
    """The control characters attune.py must never write to a terminal (newline aside)."""
    return sorted({c for c in text if c != "\n" and attune.is_control(c)})


class UntrustedInputTests(AttuneTestCase):
    DEADLINE = 20  # seconds: a hang fails the run long before the suite's own limits

    def setUp(self):
        super().setUp()
        self.seed()
        self.token = self.profile()["auth_token"]
        self.fifo = os.path.join(self.tmp, "fifo")
        if hasattr(os, "mkfifo"):
            os.mkfifo(self.fifo)

    def run_table(self, cases):
        """Run (label, argv, env, stdin, expected codes) cases through attune.main in this
        process (the subject is the input, not the process: ProcessTests cover those);
        [(label, codes, Result, seconds)]. An exception that escapes main() is a Result whose
        stderr holds its traceback, so the table reports it as it would a crashed process."""
        results = []
        for label, argv, env, stdin, codes in sampled(cases):
            started = time.monotonic()
            try:
                result = self.run_cli(*argv, env=env, stdin=stdin or "", secrets_ok=True)
            except Exception:
                import traceback
                result = Result(None, "", traceback.format_exc())
            results.append((label, codes, result, time.monotonic() - started))
        return results

    def check_table(self, cases, unchanged=True):
        before = self.snapshot()[0]
        results = self.run_table(cases)
        for label, codes, result, seconds in results:
            with self.subTest(label):
                self.assertIn(result.code, codes, result)
                self.assertLess(seconds, self.DEADLINE, result)
                self.assertNotIn("Traceback", result.err, result)
                self.assert_no_leak(result, stdout_ok=True)
                self.assertNotIn(self.token, result.err)
                self.assertEqual(raw_controls(result.out + result.err), [], result)
                if result.code:
                    self.assertEqual(result.out, "", result)
                    lines = result.err.splitlines()
                    errors = [line for line in lines if " error: " in line]
                    self.assertEqual(len(errors), 1, result)
                    self.assertTrue(all(line.startswith(("attune", "usage: ", " ")) for line in lines), result)
                    self.assertLess(len(errors[0]), 400, result)
        if unchanged:
            self.assertEqual(self.snapshot()[0], before, "the credential file changed")
        return results

    # 1. API URLs ---------------------------------------------------------------
    def hostile_urls(self):
        rng = random.Random(10)
        good = self.server.url
        urls = ["not a url", "http://[::1", "http://[zz::1]:80", "http://host:99999", "http://host:abc",
                "http://host:0", "http://host:-1", "http://host:+80", "http://host:\u0663", "http://host:",
                "ftp://host", "http://", "http:///path", "javascript:alert(1)", "http://a b", "http://h\u00f3st",
                "http://user:pw-in-url@127.0.0.1", good + "/?q=1", good + "/#frag", "http://" + "a" * 70000,
                "http://" + "a" * 64 + ".com", "http://a..b", " ", "http://host\\@evil"]
        for control in CONTROL_SAMPLES[:-1]:  # NUL cannot travel in argv or the environment
            at = rng.randint(1, len(good) - 1)  # inside: surrounding whitespace is trimmed
            urls.append(good[:at] + control + good[at:])
        self.extra_secrets = {"pw-in-url"}
        return urls

    def test_api_urls_from_every_source(self):
        urls = self.hostile_urls()
        doc = self.read_doc()
        for i, url in enumerate(urls):
            doc["profiles"]["u%d" % i] = {"api_url": url, "auth_token": self.token}
        doc["profiles"]["nul"] = {"api_url": self.server.url + "\x00", "auth_token": self.token}
        self.write_doc(doc)
        cases = [("profile nul", ["-p", "nul", "pack", "list"], None, "", (3,))]
        for i, url in enumerate(urls):
            cases += [
                ("--api-url %r" % url[:40], ["--api-url", url, "pack", "list"], None, "", (3,)),
                ("ATTUNE_API_URL %r" % url[:40], ["pack", "list"], {"ATTUNE_API_URL": url}, "", (3,)),
                ("profile %r" % url[:40], ["-p", "u%d" % i, "pack", "list"], None, "", (3,)),
                ("auth token, profile %r" % url[:40], ["-p", "u%d" % i, "auth", "token"], None, "", (3,)),
                ("login --url %r" % url[:40], ["auth", "login", "--url", url, "-u", "admin", "--password-stdin"],
                 None, "s3cret-Admin-pw\n", (3,)),
                ("config set api_url %r" % url[:40], ["config", "set", "api_url", url], None, "", (3,)),
                ("add-profile --api-url %r" % url[:40], ["config", "add-profile", "new", "--api-url", url],
                 None, "", (3,))]
        for label, _, result, _ in self.check_table(cases):
            if "a" * 100 not in label:
                self.assertIn("API URL from", result.err, label)
        # a URL with surrounding whitespace (a file saved on Windows) is the URL
        self.ok("--api-url", " %s/\r\n" % self.server.url, "pack", "list")

    # 2. tokens -----------------------------------------------------------------
    def test_tokens_from_every_source(self):
        token = self.token
        fine = [token + end for end in ("\r", "\n", "\r\n", " ", "\t", "\n\n")] + ["  " + token]
        bad = [token[:20] + c + token[20:] for c in (" ", "\r", "\x1b", "\u00e9", "\u202e", "\x7f", "\t")]
        bad += ["   ", token + "\u00a0x"]
        path = os.path.join(self.tmp, "token")
        cases, files = [], {}
        for n, value in enumerate(fine + bad):
            codes = (0,) if value in fine else (3,)
            files[n] = os.path.join(self.tmp, "token-%d" % n)
            with open(files[n], "w", encoding="utf-8", newline="") as f:
                f.write(value)
            for argv in (("pack", "list"), ("auth", "token", "--format", "header"), ("auth", "whoami")):
                for source, env in (("ATTUNE_API_TOKEN", {"ATTUNE_API_TOKEN": value}),
                                    ("ATTUNE_AUTH_TOKEN", {"ATTUNE_AUTH_TOKEN": value}),
                                    ("ATTUNE_TOKEN_FILE", {"ATTUNE_TOKEN_FILE": files[n]}),
                                    ("ATTUNE_REFRESH_TOKEN", {"ATTUNE_API_TOKEN": token, "ATTUNE_REFRESH_TOKEN": value})):
                    cases.append(("%s %r: %s" % (source, value[-3:], " ".join(argv)), list(argv), env, "", codes))
        with open(path, "wb") as f:
            f.write(b"\xff\xfe" + token.encode())
        cases.append(("token file not UTF-8", ["pack", "list"], {"ATTUNE_TOKEN_FILE": path}, "", (3,)))
        results = self.check_table(cases)
        for label, codes, result, _ in results:
            if "--format header" in label and result.code == 0:
                self.assertEqual(result.out, "Authorization: Bearer %s\n" % token, label)
            if result.code:
                self.assertTrue(re.search("malformed|empty|not UTF-8", result.err), (label, result))
        # the same tokens in the credential file
        for value in fine + bad:
            doc = self.read_doc()
            doc["profiles"]["default"]["auth_token"] = value
            self.write_doc(doc)
            result = self.run_cli("auth", "token", secrets_ok=True)
            self.assertEqual(result.code, 0 if value in fine else 3, result)
            self.assertEqual(result.out, token + "\n" if value in fine else "")
            self.assertNotIn(token[20:], result.err)

    def test_junk_tokens_in_login_and_refresh_answers_store_nothing(self):
        junk = ["a\r\nb", "a b", "\x1b[2J", "", 42, None, ["x"], {"t": 1}, "\u00e9t\u00e9", "x" * 10 + "\x00"]
        for value in junk:
            with self.subTest(value=value):
                before = self.snapshot()[0]
                answer = {"data": {"access_token": value, "refresh_token": value, "expires_in": 3600}}
                self.server.fail("/auth/login", status=200, body=answer)
                result = self.run_cli("auth", "login", "-u", "admin", "--password-stdin",
                                      stdin="s3cret-Admin-pw\n")
                self.assertEqual(result.code, 1, result)
                self.assertIn("the server's answer" if value else "no access token", result.err)
                self.assertEqual(raw_controls(result.err), [])
                self.assertEqual(self.snapshot()[0], before)
                self.server.faults.clear()
        # a refresh answer: the old, still valid token is kept and used
        self.seed(access_left=100)
        before = self.snapshot()[0]
        self.server.fail("/auth/refresh", status=200,
                         body={"data": {"access_token": "bad\r\ntoken", "refresh_token": "r", "expires_in": 60}})
        result = self.run_cli("pack", "list")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(self.snapshot()[0], before)

    def test_one_broken_profile_spoils_no_other(self):
        doc = self.read_doc()
        doc["profiles"]["junk"] = {"api_url": self.server.url, "auth_token": "a b\x1b[2J"}
        self.write_doc(doc)
        result = self.run_cli("auth", "status", "--all", "--offline")
        self.assertEqual(result.code, 3, result)
        self.assertIn("Profile: default (current)", result.out)
        self.assertIn("Status:   unusable", result.out)
        self.assertEqual(raw_controls(result.out + result.err), [])
        statuses = self.run_cli("auth", "status", "--all", "--offline", "-j").json()
        self.assertEqual([s["logged_in"] for s in statuses], [True, False])
        self.assertEqual([(s["state"], s["usable_here"]) for s in statuses], [("logged in", True), ("unusable", False)])
        # a login answer whose user is not an object of text keeps the name typed
        answer = {"data": {"access_token": self.token, "refresh_token": self.token, "expires_in": 3600,
                           "user": {"login": ["x"], "id": "1"}}}
        self.server.fail("/auth/login", status=200, body=answer)
        self.ok("auth", "login", "-u", "admin", "--password-stdin", stdin="s3cret-Admin-pw\n")
        self.assertEqual(self.profile()["username"], "admin")

    # 3. profile names ----------------------------------------------------------
    def test_profile_names_are_checked_when_created(self):
        rng = random.Random(3)
        bad = ["", "-x", ".x", "_x", "a" * 65, "a b", "a\nb", "a\x1b[2Jb", "a/b", "\u00e9", "a:b",
               "a\u202eb", "../etc", "a\tb"]
        bad += hostile_strings(rng, "ab/\\:*?\"<>| \t\x1b\u00e9\u202e", 12)
        good = ["a", "A" * 64, "prod-1", "eu.west_2"] + \
            ["x" + s for s in hostile_strings(rng, "abcXYZ019._-", 8, length=20)]
        cases = []
        for name in bad:
            cases += [("add-profile %r" % name, ["config", "add-profile", name, "--api-url", self.server.url],
                       None, "", (2,)),
                      ("login --save-profile %r" % name, ["auth", "login", "--save-profile", name, "-u", "admin",
                                                         "--password-stdin"], None, "s3cret-Admin-pw\n", (2,)),
                      ("-p %r auth login" % name, ["-p", name, "auth", "login", "-u", "admin", "--password-stdin"],
                       None, "s3cret-Admin-pw\n", (2,))]
        self.check_table(cases)
        results = self.check_table([("add-profile " + name, ["config", "add-profile", name, "--api-url",
                                                              self.server.url], None, "", (0,)) for name in good],
                                   unchanged=False)
        added = {label[len("add-profile "):] for label, _, _, _ in results}
        self.assertTrue(added)
        self.assertLessEqual(added, set(self.read_doc()["profiles"]))

    def test_names_from_the_environment_are_echoed_safely(self):
        cases = [("ATTUNE_PROFILE %r" % c, ["pack", "list"], {"ATTUNE_PROFILE": "x" + c + "y"}, "", (3,))
                 for c in CONTROL_SAMPLES[:-1] + ["\n"]]
        doc = self.read_doc()
        doc["profiles"]["evil\x1b]0;title\x07\nname"] = {"api_url": self.server.url}
        self.write_doc(doc)
        cases += [("config profiles", ["config", "profiles"], None, "", (0,)),
                  ("config profiles --names", ["config", "profiles", "--names"], None, "", (0,)),
                  ("config list", ["config", "list"], None, "", (0,))]
        self.check_table(cases)

    # 4. files from outside -----------------------------------------------------
    @unittest.skipUnless(POSIX, "FIFOs, devices and sockets")
    def test_files_that_are_not_regular_files(self):
        sock_path = os.path.join(self.tmp, "sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(sock_path)
        self.addCleanup(server.close)
        big = os.path.join(self.tmp, "big")
        with open(big, "wb") as f:
            f.truncate(600 << 20)  # sparse: bigger than any bound, costs nothing
        kinds = {"FIFO": self.fifo, "/dev/zero": "/dev/zero", "/dev/null": "/dev/null", "directory": self.tmp,
                 "socket": sock_path, "600 MiB": big, "missing": os.path.join(self.tmp, "missing")}
        cases = []
        for kind, path in kinds.items():
            cases += [("ATTUNE_TOKEN_FILE %s" % kind, ["pack", "list"], {"ATTUNE_TOKEN_FILE": path}, "", (3,)),
                      ("--ca-bundle %s" % kind, ["--ca-bundle", path, "--api-url", "https://127.0.0.1:1",
                                                 "pack", "list"], None, "", (3,)),
                      ("ATTUNE_CA_BUNDLE %s" % kind, ["--api-url", "https://127.0.0.1:1", "pack", "list"],
                       {"ATTUNE_CA_BUNDLE": path}, "", (3,)),
                      ("--data @%s" % kind, ["api", "POST", "/packs", "--data", "@" + path], None, "", (2,)),
                      ("pack upload %s" % kind, ["pack", "upload", path], None, "", (2,))]
            if kind != "missing":  # a missing credential file is no file yet: not logged in
                cases += [("ATTUNE_CONFIG %s" % kind, ["pack", "list"], {"ATTUNE_CONFIG": path}, "", (3,)),
                          ("--config %s" % kind, ["--config", path, "auth", "token"], None, "", (3,))]
        self.check_table(cases)

    @unittest.skipUnless(POSIX and os.geteuid() == 0 and shutil.which("mount"), "needs root to mount a tmpfs")
    def test_a_full_disk_keeps_the_old_file(self):
        mount = os.path.join(self.tmp, "small")
        os.mkdir(mount)
        if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount],
                           stderr=subprocess.DEVNULL):
            self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.call, ["umount", "-l", mount])
        config = os.path.join(mount, "credentials.json")
        shutil.copy(self.config, config)
        os.chmod(config, 0o600)
        with open(config, "rb") as f:
            before = f.read()
        with open(os.path.join(mount, "filler"), "wb", buffering=0) as f:  # leave less than a page
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        result = self.run_cli("config", "set", "description", "y" * 20000, env={"ATTUNE_CONFIG": config})
        self.assertEqual(result.code, 3, result)
        self.assertIn("cannot write credential file %s: No space left on device" % config, result.err)
        with open(config, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(mount)), ["credentials.json", "credentials.json.lock", "filler"])

    # 5. numbers ----------------------------------------------------------------
    def test_numbers_in_flags_and_the_environment(self):
        values = ["-1", "nan", "inf", "-inf", "1e400", "", " 5", "5 ", "1_0", "\u0663", "\u00b2", "0x10", "1e3", "9" * 5000,
                  "99999999999999999999999", "3.5", "0", "7", "+7", "-0", ".5", "5.", "1e-3", "--1", "1e", "e1"]

        def valid(text, integer, low, high):
            pattern = r"[+-]?[0-9]+" if integer else r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
            if not re.fullmatch(pattern, text) or len(text) > 400:  # 5,000 nines: out of every range
                return False
            value = int(text) if integer else float(text)
            return low <= value <= high

        year10 = attune.MAX_SECONDS
        flags = [(["auth", "token", "--min-ttl"], [], True, 0, year10),
                 (["--wait-for-server"], ["auth", "token"], False, 0, year10),
                 (["execution", "list", "--limit"], [], True, 1, 100000),
                 (["execution", "show"], [], True, 1, 2 ** 63 - 1),
                 (["health", "--wait"], [], False, 0, year10),
                 (["action", "execute", "core.echo", "--param", "message=x", "-w", "--timeout"], [], True, 1, year10)]
        cases = []
        for before, after, integer, low, high in flags:
            for value in values:
                if value.startswith("-") and before[-1] in ("show",):
                    continue  # a word starting with '-' is an option there, as in every CLI
                ok = valid(value, integer, low, high)
                argv = before + (["--", value] if before[-1] == "show" and value.startswith("-") else [value]) + after
                cases.append(("%s %r" % (" ".join(before), value), argv, None, "", (0, 1) if ok else (2,)))
        for name, low in (("ATTUNE_TIMEOUT", 0.001), ("ATTUNE_LOCK_TIMEOUT", 0)):
            for value in values:
                ok = value == "" or valid(value.strip(), False, low, year10)
                codes = (0, 5) if ok else (3,)  # 5: a valid but tiny ATTUNE_TIMEOUT runs out
                cases.append(("%s=%r" % (name, value), ["auth", "whoami"], {name: value}, "", codes))
        for value in values:  # a terminal hint: a bad COLUMNS is ignored, never an error
            cases.append(("COLUMNS=%r" % value, ["pack", "list"], {"COLUMNS": value}, "", (0,)))
        self.check_table(cases, unchanged=False)

    # 6. answers of the wrong shape ---------------------------------------------
    LISTS = [(("pack", "list"), "/api/v1/packs"), (("action", "list"), "/api/v1/actions"),
             (("execution", "list"), "/api/v1/executions"), (("rule", "list"), "/api/v1/rules"),
             (("trigger", "list"), "/api/v1/triggers"), (("sensor", "list"), "/api/v1/sensors"),
             (("key", "list"), "/api/v1/keys"), (("workflow", "list"), "/api/v1/workflows"),
             (("inquiry", "list"), "/api/v1/inquiries"), (("artifact", "list"), "/api/v1/artifacts"),
             (("artifact", "version", "list", "1"), "/api/v1/artifacts/1/versions"),
             (("identity", "list"), "/api/v1/identities"), (("audit", "list"), "/api/v1/audit-events"),
             (("policy", "list"), "/api/v1/policies"), (("permission", "set", "list"), "/api/v1/permissions/sets"),
             (("permission", "assignment", "list"), "/api/v1/permissions/assignments"),
             (("queue", "list"), "/api/v1/queues"),
             (("queue", "items", "core.inbox", "list"), "/api/v1/queues/core.inbox/items"),
             (("queue", "items", "core.inbox", "show", "1"), "/api/v1/queues/core.inbox/items"),
             (("cache", "namespace", "list", "--owner-type", "system"), "/api/v1/cache/namespaces")]
    SHOWS = [(("pack", "show", "core"), "/api/v1/packs/core"),
             (("action", "show", "core.echo"), "/api/v1/actions/core.echo"),
             (("rule", "show", "examples.on_timer"), "/api/v1/rules/examples.on_timer"),
             (("trigger", "show", "core.timer"), "/api/v1/triggers/core.timer"),
             (("sensor", "show", "core.timer_sensor"), "/api/v1/sensors/core.timer_sensor"),
             (("key", "show", "region"), "/api/v1/keys/region"),
             (("workflow", "show", "examples.deploy"), "/api/v1/workflows/examples.deploy"),
             (("auth", "whoami"), "/auth/me"),
             (("inquiry", "show", "1"), "/api/v1/inquiries/1"), (("artifact", "show", "1"), "/api/v1/artifacts/1"),
             (("artifact", "version", "show", "1", "1"), "/api/v1/artifacts/1/versions/1"),
             (("identity", "show", "--identity-id", "1"), "/api/v1/identities/1"),
             (("audit", "show", "1"), "/api/v1/audit-events/1"), (("policy", "show", "core.limit"), "/api/v1/policies/core.limit"),
             (("permission", "set", "show", "core.admin"), "/api/v1/permissions/sets/by-ref/core.admin"),
             (("queue", "show", "core.inbox"), "/api/v1/queues/core.inbox")]

    def test_answers_of_the_wrong_shape(self):
        """Whole answers of the wrong shape are one-line API errors (exit 1), as processes."""
        lists = [{"data": ["a", "b"]}, {"data": [1, 2]}, {"data": [None]}, {"data": None}, {"data": "x"},
                 {"items": [[]]}, "null", "[1]", {"data": {"ref": "x"}}, {"error": None}, True, "\"text\""]
        shows = [{"data": None}, {"data": []}, {"data": "x"}, {"data": 5}, [], "null", {}, {"data": [{}]}]
        cases = []
        port = self.server.port
        for argv, path in self.LISTS:
            for n, body in enumerate(lists):
                cases.append((argv, path, body))
        for argv, path in self.SHOWS:
            for body in shows:
                cases.append((argv, path, body))
        for argv, path, body in sampled(cases):
            with self.subTest(argv=argv, body=body):
                self.server.fail(path, method="GET", status=200, body=body)
                result = self.run_cli(*argv)
                self.server.faults.clear()
                self.assertEqual(result.code, 1, result)
                self.assertEqual(result.out, "")
                self.assertEqual(len(result.err.splitlines()), 1, result)
                self.assertTrue(result.err.startswith("attune: error: the server"), result)
        self.assertEqual(self.server.port, port)

    @slow
    def test_fields_of_the_wrong_type(self):
        """Every field of every listed or shown object, in turn, of every wrong type:
        printed as data or refused in one line, never a traceback."""
        wrong = [None, 7, 2.5, True, "x\x1b[2J", [], ["a", {"b": 1}], {}, {"k": [1]}, "", -1]
        self.ok("run", "core.echo", "--param", "message=hi")  # something for execution list
        for argv, path in self.LISTS + self.SHOWS:
            original = self.run_cli(*argv, "-j").json()
            sample = original[0] if isinstance(original, list) else original
            for i, field in sampled(list(enumerate(sorted(sample)))):
                for value in (wrong * 2)[i % len(wrong):][:6]:  # six of the wrong types, turn by turn
                    with self.subTest(argv=argv, field=field, value=value):
                        changed = dict(sample, **{field: value})
                        body = {"data": [changed]} if isinstance(original, list) else {"data": changed}
                        self.server.fail(path, method="GET", status=200, body=body, times=None)
                        result = self.run_cli(*argv)
                        self.server.faults.clear()
                        self.assertIn(result.code, (0, 1), result)
                        self.assertEqual(raw_controls(result.out + result.err), [])
                        if result.code:
                            self.assertEqual(len(result.err.splitlines()), 1, result)

    # 7. terminal safety --------------------------------------------------------
    def test_server_text_cannot_drive_the_terminal(self):
        for n, control in enumerate(CONTROL_SAMPLES):
            self.server.packs["core"]["description"] = "Core " + control + " actions"
            self.server.packs["core"]["label"] = control + "Label"
            self.server.fail("/api/v1/packs/nope", status=404,
                             body={"error": "Pack " + control + " not found", "code": "NOT_FOUND"})
            cases = [("pack list %r" % control, ["pack", "list"], None, "", (0,)),
                     ("pack show %r" % control, ["pack", "show", "core"], None, "", (0,)),
                     ("error line %r" % control, ["pack", "show", "nope"], None, "", (1,)),
                     ("pack list --yaml %r" % control, ["pack", "list", "--yaml"], None, "", (0,))]
            results = self.check_table(cases)
            json_result = self.run_cli("pack", "show", "core", "--json")
            self.assertEqual(json_result.json()["description"], "Core " + control + " actions")  # exact
            for label, _, result, _ in results:
                if "error line" in label:
                    self.assertIn("Pack " + attune.terminal_safe(control, keep="") + " not found", result.err)
                elif "show" in label:
                    self.assertIn("Core " + attune.terminal_safe(control, keep="") + " actions", result.out)

    def test_execution_logs_stay_as_the_action_wrote_them(self):
        eid = self.ok("run", "core.echo", "--param", "message=colour \x1b[32mgreen\x1b[0m", "-j").json()["id"]
        result = self.run_cli("execution", "logs", str(eid), "--follow")
        self.assertEqual(result.code, 0, result)
        self.assertIn("colour \x1b[32mgreen\x1b[0m\n", result.out)  # the action's own colours


# === Tests: the README =======================================================

README = os.path.join(HERE, "README.md")
SANDBOX_URL = "http://127.0.0.1:8080"  # where the README's samples find the sandbox


def readme_samples(sections=("Walkthrough", "Troubleshooting")):
    """The samples of these README sections, in order: ("console", title, command, expected
    lines) for each `$ command` of a console block and ("text", title, None, lines) for a text
    block; title is the bold start of the paragraph above it ('The wrong URL')."""
    samples, section, title, block = [], None, None, None
    with open(README, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line in lines:
        if block is None:
            if line.startswith("## ") or line.startswith("# "):
                section = line.lstrip("#").strip()
            elif line.startswith("**") and "**" in line[2:]:
                title = line[2:line.index("**", 2)].rstrip(".")
            elif line.startswith("```"):
                block = line[3:] if section in sections else "elsewhere"
                if block == "text":
                    samples.append(("text", title, None, []))
        elif line == "```":
            block = None
        elif block == "console" and line.startswith("$ "):
            samples.append(("console", title, line[2:], []))
        elif block in ("console", "text"):
            samples[-1][3].append(line)
    return samples


def matches_sample(expected, actual):
    """actual (a list of lines) is what expected shows: '...' in a line stands for any text, a
    line of '...' alone for any number of lines."""
    pattern = "".join(r"(?:[^\n]*\n)*?" if line == "..." else
                      ".*".join(re.escape(part) for part in line.split("...")) + r"\n" for line in expected)
    return re.fullmatch(pattern, "".join(line.rstrip() + "\n" for line in actual)) is not None


@unittest.skipUnless(POSIX, "the samples are sh command lines")
class ReadmeTests(AttuneTestCase):
    """What the README shows is what attune.py does: every sample of the walkthrough and of
    Troubleshooting is run (against the sandbox it starts, as the README says), and each
    message it quotes is provoked here and compared."""

    def setUp(self):
        super().setUp()
        self.samples = readme_samples()
        self.assertGreater(len(self.samples), 20)

    def check(self, expected, actual, what):
        self.assertTrue(matches_sample(expected, actual), "%s\n--- the README shows:\n%s\n--- attune.py printed:\n%s"
                        % (what, "\n".join(expected), "\n".join(actual)))

    def test_the_contents_list_every_section_and_every_link_has_its_place(self):
        """The Contents are the README's headings (# and ##), in order; every #link in the
        README leads to a heading, as GitHub names them (lower case, punctuation dropped,
        spaces as hyphens)."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            text = f.read()
        headings, fenced = [], False
        for line in text.split("\n"):
            fenced = fenced != line.startswith("```")
            if not fenced and re.match(r"#{1,2} ", line) and not line.startswith("```"):
                headings.append(line.split(" ", 1)[1])
        slug = lambda title: re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")  # noqa: E731
        contents = text.split("**Contents:**\n\n", 1)[1].split("\n\n", 1)[0].split("\n")
        self.assertEqual([re.match(r" *- \[(.*)\]\(#(.*)\)$", item).groups() for item in contents],
                         [(title, slug(title)) for title in headings[1:]])
        links = re.findall(r"\]\(#([^)]*)\)", text)
        self.assertGreater(len(links), len(contents))
        self.assertEqual(sorted(set(links) - {slug(title) for title in headings}), [])

    def test_matching_a_sample(self):
        self.assertTrue(matches_sample(["a ... c", "...", "z"], ["a b c", "x", "y", "z"]))
        self.assertTrue(matches_sample(["...", "z"], ["z"]))
        self.assertFalse(matches_sample(["a ... c"], ["a b d"]))
        self.assertFalse(matches_sample(["a"], ["a", "b"]))
        self.assertFalse(matches_sample(["a.c"], ["abc"]))

    def test_every_console_sample_shows_what_it_prints(self):
        """The samples in order, in one home directory (shown as /home/me), as a newcomer pastes
        them: the first starts the sandbox (on a free port instead of 8080), the others run in
        sh with stdout and stderr as one stream, as a terminal shows them."""
        home = os.path.join(self.tmp, "walk")
        bindir = os.path.join(home, "bin")
        os.makedirs(bindir)
        with open(os.path.join(bindir, "attune"), "w") as f:
            f.write("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(shlex.quote(a) for a in attune_argv()))
        os.chmod(os.path.join(bindir, "attune"), 0o755)
        env = child_env({"HOME": home, "PATH": bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
                         "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"})
        consoles = [s for s in self.samples if s[0] == "console"]
        kind, title, command, expected = consoles[0]
        self.assertEqual(command, "python3 test_attune.py serve --port 8080")
        sandbox = subprocess.Popen([sys.executable, os.path.join(HERE, "test_attune.py"), "serve", "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        self.addCleanup(sandbox.wait)
        self.addCleanup(sandbox.stdout.close)
        self.addCleanup(sandbox.terminate)
        import select  # a hang guard: the sandbox says where it listens at once
        self.assertTrue(select.select([sandbox.stdout], [], [], 60)[0], "the sandbox did not start")
        first = sandbox.stdout.readline().rstrip("\n")
        url = re.search(r"http://127\.0\.0\.1:\d+", first).group(0)
        self.check(expected, [first.replace(url, SANDBOX_URL)], command)
        ran = 1
        for kind, title, command, expected in consoles[1:]:
            if "curl " in command and shutil.which("curl") is None:
                continue  # this machine has no curl; the command is the README's, not attune.py's
            p = subprocess.run(["sh", "-c", command.replace(SANDBOX_URL, url)], cwd=home, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=120, preexec_fn=lambda: os.umask(0o022))  # a newcomer's usual umask
            actual = p.stdout.decode("utf-8").replace(url, SANDBOX_URL).replace(home, "/home/me").split("\n")
            with self.subTest(command=command):
                self.check(expected, actual[:-1] if actual[-1] == "" else actual, "%s: $ %s" % (title, command))
            ran += 1
        self.assertEqual(ran, len(consoles) - (shutil.which("curl") is None))

    def test_every_command_line_in_the_readme_parses(self):
        """Every attune command line in a script sample anywhere in the README (the first
        screen, bootstrap scripts, the reference) is one argparse takes; the console samples
        are run by the test above, and a text sample is a message."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        blocks, fence = [], None
        for line in text.split("\n"):
            if line.startswith("```"):
                fence = None if fence is not None else (line[3:], [])
                if fence is not None and fence[0] in ("sh", "bash", ""):
                    blocks.append(fence[1])
            elif fence is not None:
                fence[1].append(line)
        blocks = ["\n".join(lines) for lines in blocks]
        blocks += re.findall(r"(?:^    .*\n)+", re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S), re.M)
        call = re.compile(r"(?:^|\$\(|<\(|\|\| |&& |; )(?:\$ )?(?:sudo )?(?:python3 )?attune(?:\.py)? ([^)<>|;&]*)")
        seen = 0
        for block in blocks:
            for line in block.replace("\\\n", " ").split("\n"):
                line = re.sub(r"\$\((?!attune)[^)]*\)", "X", line.strip())
                for words in call.findall(line):
                    try:
                        argv = shlex.split(words, comments=True)
                    except ValueError:
                        self.fail("%r: %r" % (line, words))
                    if not argv or argv[0] in ("serve",):
                        continue
                    with self.subTest(line=line), contextlib.redirect_stderr(io.StringIO()) as err:
                        try:
                            attune.parse_args(argv)
                        except (SystemExit, attune.UsageError) as e:
                            self.fail("%s: %s %s" % (line, e, err.getvalue()))
                    seen += 1
        self.assertGreater(seen, 10)

    def test_the_sample_credential_file_is_one_attune_writes(self):
        """The README's credential file has the keys, value types and auth_method of a file a
        password login, config set description and config set ca_bundle write."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        sample = json.loads(re.search(r"^## The credential file\n.*?^```json\n(.*?)^```$", text, re.M | re.S).group(1))
        self.assertEqual(self.run_cli("auth", "login", "--url", self.server.url, "-u", "admin", "--password-stdin",
                                      stdin=PASSWORD).code, 0)
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        self.ok("config", "set", "description", "production")
        self.ok("config", "set", "ca_bundle", ca)
        doc = self.read_doc()
        self.assertEqual(sorted(sample), sorted(doc))
        self.assertEqual(sample["version"], doc["version"])
        written, shown = doc["profiles"]["default"], list(sample["profiles"].values())[0]
        self.assertEqual(sorted(shown), sorted(written))
        for key, value in written.items():
            self.assertEqual(type(shown[key]), type(value), key)
        self.assertEqual(shown["auth_method"], written["auth_method"])

    # -- the messages Troubleshooting quotes without a command to run ----------
    def quoted(self, title):
        found = [lines for kind, t, _, lines in self.samples if kind == "text" and t == title]
        self.assertEqual(len(found), 1, title)
        return found[0]

    def provoke(self, title, actual):
        """Each line the README quotes under title is a line attune.py printed."""
        for line in self.quoted(title):
            self.assertTrue(any(matches_sample([line], [a]) for a in actual), "%s\n--- the README shows:\n%s\n"
                            "--- attune.py printed:\n%s" % (title, line, "\n".join(actual)))

    def test_every_quoted_message_has_a_case_here(self):
        titles = [t for kind, t, _, _ in self.samples if kind == "text"]
        cases = [getattr(self, name).__doc__.strip() for name in dir(self) if name.startswith("test_message_")]
        self.assertEqual(sorted(titles), sorted(cases))

    def test_message_tls(self):
        """TLS and CA bundles"""
        tls = FakeAttune(tls=True).start()
        self.addCleanup(tls.stop)
        where = "https://127.0.0.1:%d" % tls.port
        result = self.run_process("--api-url", where, "pack", "list")
        self.assertEqual(result.code, 5, result)
        self.provoke("TLS and CA bundles", [line.replace(where + ":%d" % tls.port, "https://attune.internal:443")
                                            .replace(where, "https://attune.internal:443")
                                            for line in result.err.splitlines()])
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        self.assertEqual(self.run_process("--api-url", where, "--ca-bundle", ca, "health").code, 0)

    def test_message_expired(self):
        """An expired or invalidated session"""
        self.seed(access_left=-100, refresh_left=-10)
        self.provoke("An expired or invalidated session", self.fails(4, "pack", "list").err.splitlines())
        self.seed(access_left=-100)
        self.server.fail("/auth/refresh", status=401, body={"error": "Invalid refresh token", "code": "UNAUTHORIZED"})
        self.provoke("An expired or invalidated session", self.fails(4, "pack", "list").err.splitlines())

    @unittest.skipUnless(POSIX, "fcntl locks")
    def test_message_lock(self):
        """The lock is held by another process"""
        self.seed()
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, self.config + ".lock", "120"],
                                  stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline(), "locked\n")
        result = self.run_process("config", "set", "description", "x", env={"ATTUNE_LOCK_TIMEOUT": "2"})
        self.assertEqual(result.code, 0, result)
        home = os.path.join(self.tmp, "home")
        self.provoke("The lock is held by another process", [
            re.sub(r"pid \d+", "pid 4121", line).replace(home, "/home/me").replace("waiting 2s", "waiting 30s")
            for line in result.err.splitlines()])

    def test_message_clock(self):
        """Clock skew"""
        self.seed()
        self.server.clock_offset = 7200.5  # Date has whole seconds: half a second either way rounds to 2h
        out = self.run_process("auth", "doctor").out
        # a request slower than a second on a loaded machine may still measure a second off
        self.provoke("Clock skew", re.sub(r"differ by (1h 59m 59s|2h 1s);", "differ by 2h;", out).splitlines())

    @unittest.skipUnless(can_unshare_mounts(), "needs root and unshare -m for a read-only mount")
    def test_message_read_only(self):
        """A credential file attune.py cannot write"""
        self.seed(access_left=-100)
        directory = os.path.dirname(self.config)
        result = in_mount_namespace(self, [(directory, directory, True)], attune_argv() + ["pack", "list"],
                                    self.process_env())
        self.assertEqual(result.code, 3, result)
        self.provoke("A credential file attune.py cannot write",
                     [line.replace(os.path.join(self.tmp, "home"), "/home/me") for line in result.err.splitlines()])
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    def test_message_permission(self):
        """A permission error"""
        self.seed()
        self.server.fail("/api/v1/packs", status=403, body={"error": "Insufficient permissions", "code": "FORBIDDEN"})
        self.provoke("A permission error", self.fails(1, "pack", "list").err.splitlines())
        self.assertEqual(self.server.log(), ["GET /api/v1/packs"])  # no refresh, no login


# === Tests: attune as a Python module ========================================

KERNEL_END = "# === Output ====="  # the sections above it are the kernel: they return or raise
FORBIDDEN_IN_KERNEL = {"print", "input", "exit", "quit", "breakpoint"}
FORBIDDEN_ATTRIBUTES = {("sys", "exit"), ("os", "_exit"), ("sys", "stdout"), ("sys", "stderr"), ("sys", "stdin"),
                        ("getpass", "getpass"), ("os", "abort"), ("os", "kill")}


def layer_violations(text):
    """[(function, what)] for each function of the kernel (everything above the Output
    section, and the module section) that prints, prompts or ends the process. Below the
    command line nothing may: it returns or raises, and main() alone turns that into words
    and an exit code. StandardStream (main's wrapper of the streams) is the command line's."""
    import ast
    kernel = text[:text.index(KERNEL_END)]
    found = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            name = where
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = child.name if where == "(module)" else where + "." + child.name
            if isinstance(child, ast.Name) and child.id in FORBIDDEN_IN_KERNEL:
                found.append((name, child.id))
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and \
                    (child.value.id, child.attr) in FORBIDDEN_ATTRIBUTES:
                found.append((name, "%s.%s" % (child.value.id, child.attr)))
            visit(child, name)
    visit(ast.parse(kernel), "(module)")
    return found


class LayerTests(unittest.TestCase):
    """Below the command layer (credential file, lock, tokens, transport, session, lists,
    the module's session()) nothing prints, prompts or exits; the guard is shown to fail."""

    def test_the_kernel_neither_prints_nor_exits(self):
        with open(ATTUNE_PY, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(layer_violations(text), [])
        marker = "\ndef session_expired(profile):"
        self.assertIn(marker, text)
        for plant, expected in (("def planted():\n    print('hi')\n", [("planted", "print")]),
                                ("def planted():\n    sys.exit(4)\n", [("planted", "sys.exit")]),
                                ("class P:\n    def m(self):\n        sys.stderr.write('x')\n", [("P.m", "sys.stderr")]),
                                ("def planted():\n    return input()\n", [("planted", "input")]),
                                ("def planted():\n    os._exit(1)\n", [("planted", "os._exit")]),
                                ("def planted(out):\n    out.write('fine: a stream handed in')\n", [])):
            with self.subTest(plant=plant):
                self.assertEqual(layer_violations(text.replace(marker, "\n" + plant + marker, 1)), expected)
        after = text.index("\n", text.index(KERNEL_END)) + 1  # the command layer may
        self.assertEqual(layer_violations(text[:after] + "def ui():\n    print('ok')\n" + text[after:]), [])


MODULE_SCRIPT = r"""
import json, sys
import attune
api = attune.session()
out = {"me": api.get("/auth/me")["login"]}
try:
    api.get("/packs/nope")
except attune.ApiError as e:
    out["missing"] = [e.status, e.exit_code]
out["token"] = api.token(min_ttl=10) == api.creds.access
print(json.dumps(out))
"""


class ModuleTests(AttuneTestCase):
    """import attune as a user would: a script beside a copied attune.py, and the installed
    module, in real processes against the fake with short token lifetimes."""
    server_options = {"refresh_mode": "single-use", "access_ttl": 60}

    def script(self, text, name="deploy.py"):
        """A script in its own directory beside a copy of attune.py; its path."""
        directory = os.path.join(self.tmp, "scripts")
        os.makedirs(directory, exist_ok=True)
        shutil.copy(ATTUNE_PY, os.path.join(directory, "attune.py"))
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_script(self, path, env=None, python=None, flags=()):
        environ = self.process_env(env)
        environ.pop("PYTHONPATH", None)  # only what the script's own directory holds
        p = subprocess.run([python or sys.executable] + list(flags) + [path], env=environ, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        result = Result(p.returncode, p.stdout, p.stderr)
        self.assert_no_leak(result)
        return result

    def test_a_script_beside_a_copied_file(self):
        old = self.seed(access_left=-100)  # the first request refreshes, and the rotation is stored
        result = self.run_script(self.script(MODULE_SCRIPT))
        self.assertEqual((result.code, result.err), (0, ""), result)
        self.assertEqual(json.loads(result.out), {"me": "admin", "missing": [404, 1], "token": True})
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 1)
        stored = self.profile()
        self.assertNotEqual((stored["auth_token"], stored["refresh_token"]), (old["auth_token"], old["refresh_token"]))

    def test_the_installed_module(self):
        prefix = os.path.join(self.tmp, "prefix")
        installed = self.run_process("self-install", "--prefix", prefix)
        self.assertEqual(installed.code, 0, installed)
        self.seed()
        path = self.script("import sys\nsys.path.insert(0, %r)\n" % os.path.join(prefix, "lib", "attune")
                           + MODULE_SCRIPT, name="installed.py")
        os.unlink(os.path.join(os.path.dirname(path), "attune.py"))
        result = self.run_script(path, flags=["-I", "-S"])
        self.assertEqual((result.code, result.err), (0, ""), result)
        self.assertEqual(json.loads(result.out)["me"], "admin")

    def test_the_readme_example_runs_as_written(self):
        with open(README, encoding="utf-8") as f:
            readme = f.read()
        section = readme[readme.index("\n## From Python\n"):]
        example = section[section.index("```python\n") + 10:section.index("\n```", section.index("```python"))]
        self.seed(access_left=-100)
        result = self.run_script(self.script(example + "\nprint(token == api.creds.access)\n", name="example.py"))
        self.assertEqual((result.code, result.err), (0, ""), result)
        lines = result.out.splitlines()
        packs = sorted(self.server.packs.values(), key=lambda p: p["id"])
        self.assertEqual(lines[0], "logged in as admin")
        self.assertEqual(lines[1:1 + len(packs)], ["%s %s" % (p["ref"], p["version"]) for p in packs])
        self.assertRegex(lines[-3], r"^execution \d+ completed$")
        self.assertEqual(lines[-2:], ["no such pack: 404", "True"])
        # expired at the start: one refresh; token(min_ttl=300) of a 60 s token: one more
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 2)

    def test_two_processes_refresh_once(self):
        self.seed(access_left=-100)
        path = self.script("import attune, sys\nattune.session().get('/auth/me')\nprint('ok')\n", name="two.py")
        environ = self.process_env()
        environ.pop("PYTHONPATH", None)
        procs = [subprocess.Popen([sys.executable, path], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True) for _ in range(2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        self.assertEqual(results, [("ok\n", "", 0)] * 2)
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 1)

    def test_an_expired_session_raises_auth_error_and_prints_nothing(self):
        self.seed(access_left=-100, refresh_left=-10)
        path = self.script("import attune, sys\ntry:\n    attune.session().get('/packs')\n"
                           "except attune.AuthError as e:\n    sys.exit(e.exit_code)\n", name="expired.py")
        result = self.run_script(path)
        self.assertEqual((result.code, result.out, result.err), (4, "", ""))
        self.assertEqual(self.server.count(), 0)
        for exc, code in ((attune.AuthError, 4), (attune.ConfigError, 3), (attune.NetworkError, 5),
                          (attune.ServerError, 6), (attune.ApiError, 1), (attune.UsageError, 2)):
            self.assertTrue(issubclass(exc, attune.AttuneError))
            self.assertEqual(exc.exit_code, code)

    def test_paginate_asks_for_a_page_only_when_the_last_is_used_up(self):
        for i in range(230):
            self.server.packs["bulk%03d" % i] = self.server.new_pack(500 + i, "bulk%03d" % i, "Bulk %d" % i)
        self.seed()
        with mock.patch.dict(os.environ, self.environ(), clear=True):
            api = attune.session()
        pages = lambda: self.server.count("GET", "/api/v1/packs")  # noqa: E731
        items = api.paginate("/packs")
        self.assertEqual(pages(), 0)
        first = next(items)
        self.assertEqual((first["ref"], pages()), ("core", 1))
        rest = [next(items) for _ in range(99)]
        self.assertEqual(pages(), 1)
        rest.append(next(items))
        self.assertEqual(pages(), 2)
        self.assertEqual(len([first] + rest + list(items)), 233)
        self.assertEqual(pages(), 3)
        self.assertEqual([r.query.get("page_size") for r in self.server.requests if r.path == "/api/v1/packs"],
                         [["100"]] * 3)
        self.assertEqual(len(list(api.paginate("/keys"))), len(self.server.keys))
        self.assertEqual(self.server.requests[-1].query.get("per_page"), ["100"])

    def test_warnings_and_logs_go_to_the_attune_logger_masked(self):
        entry = self.seed(access_left=-100)
        os.chmod(self.config, 0o644)  # worth a warning
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append((record.levelname, record.getMessage()))
        logger = logging.getLogger("attune")
        keep = Keep(level=logging.DEBUG)
        logger.addHandler(keep)
        self.addCleanup(logger.removeHandler, keep)
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.DEBUG)
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, self.environ(), clear=True), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            self.assertEqual(attune.session().get("/auth/me")["login"], "admin")
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))
        self.assertIn("WARNING", [level for level, _ in records])
        self.assertTrue(any("refreshing" in message for _, message in records), records)
        for _, message in records:
            for secret in (entry["auth_token"], entry["refresh_token"], self.profile()["auth_token"]):
                self.assertNotIn(secret, message)

    def test_run_and_wait_returns_the_finished_execution(self):
        self.seed()
        with mock.patch.dict(os.environ, self.environ(), clear=True):
            api = attune.session()
        started = api.run("core.echo", {"message": "from python"})
        self.assertIn(started["status"], ("requested", "scheduled"))
        finished = api.run("core.echo", {"message": "waited"}, wait=True, timeout=60)
        self.assertEqual(finished["status"], "completed")
        self.assertEqual(finished["result"]["stdout"].strip(), "waited")
        self.assertEqual(api.post("/executions/execute", {"action_ref": "core.echo", "parameters": {}})["action_ref"],
                         "core.echo")
        with self.assertRaises(attune.AttuneError) as caught:
            api.run("core.sleep", {"seconds": 30}, wait=True, timeout=0.5)
        self.assertIn("timed out after 0.5s waiting for execution", str(caught.exception))

    def test_importing_has_no_side_effects(self):
        home = os.path.join(self.tmp, "home")
        os.makedirs(home)
        probe = ("import signal, sys\nsys.argv = ['x', '--help']\n"
                 "before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)]\n"
                 "loaded = set(sys.modules)\n"
                 "import attune\n"
                 "assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)] == before\n"
                 "assert sorted(attune.__all__) == sorted(n for n in attune.__all__ if hasattr(attune, n))\n"
                 "new = set(sys.modules) - loaded\n"  # under coverage, argparse is its own
                 "assert not new & {'json', 'argparse', 're', 'urllib', 'ssl', 'logging'}, new\n")
        result = self.run_script(self.script(probe, name="probe.py"), env={"HOME": home})
        self.assertEqual((result.code, result.out, result.err), (0, "", ""), result)
        self.assertEqual(os.listdir(home), [])
        self.assertEqual(sorted(attune.__all__), sorted(["session", "Session", "AttuneError", "UsageError",
                                                         "ConfigError", "AuthError", "NetworkError", "ApiError",
                                                         "ServerError", "main", "__version__"]))


# === Tests: start-up =========================================================

class QuickPathTests(AttuneTestCase):
    """`auth token`, --help and --version start without argparse and re; they run the
    same functions as every other command."""

    def quick_and_full(self, argv):
        quick = attune.quick_args(argv)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                full = vars(attune.parse_args(argv))
        except (SystemExit, attune.UsageError):  # argparse's refusal, or the one-line one for a typo
            full = None
        return (None if quick is None else vars(quick)), full

    def quick_ones_agree(self, table):
        """For the sampled argv of table: where quick_args parses one, it equals argparse's
        result. How many it parsed."""
        quick_ones = 0
        for argv in sampled(table):
            with self.subTest(argv):
                quick, full = self.quick_and_full(argv)
                if quick is not None:
                    quick_ones += 1
                    self.assertEqual(quick, full)
        return quick_ones

    @slow
    def test_quick_arguments_are_what_argparse_makes(self):
        head = [[], ["-p", "a"], ["--profile=a"], ["--api-url", "http://h:1"], ["--config", "c.json"], ["-j"],
                ["--output", "table"], ["--output", "xml"], ["--insecure"], ["-v"], ["--prof", "a"], ["-pa"],
                ["--json=1"], ["-h"], ["--version"], ["--wait-for-server", "3"], ["-p"], ["--"]]
        middle = [[], ["-p", "b"], ["--format", "raw"], ["--yaml"]]
        tail = [[], ["--format", "env"], ["--format=header"], ["--format", "json", "-p", "c"], ["--min-ttl", "600"],
                ["--min-ttl=60"], ["--min-ttl", "-5"], ["--min-ttl", "x"], ["--min-ttl", "1_0"], ["--min-ttl", "\u00b2"],
                ["--min-ttl", "\u0663"], ["--min-ttl", ""], ["--format", "bad"],
                ["extra"], ["-j", "-y"], ["--format"], ["--api-url", "-x"], ["--ca-bundle", "ca.pem"]]
        table = [h + words[:1] + m + words[1:] + t for h in head for m in middle for t in tail
                 for words in (["auth", "token"], ["auth", "status"], ["token", "auth"])]
        random.Random(12).shuffle(table)  # so that a sampled third takes every shape, not every third one
        quick_ones = self.quick_ones_agree(table)
        self.assertGreater(quick_ones, 150 * len(sampled(table)) // len(table))
        self.assertEqual(self.run_cli("auth", "token", "--min-ttl", "\u00b2").code, 2)  # isdigit(), yet not int()
        for argv in (["auth", "token"], ["-p", "x", "auth", "token", "--format", "env", "--min-ttl", "5"],
                     ["auth", "-j", "token", "--config", "c", "--api-url", "http://h"]):
            self.assertIsNotNone(attune.quick_args(argv), argv)

    @slow
    def test_every_quick_command_parses_as_argparse_does(self):
        """Every command quick_args parses alone, with each of its options in each spelling
        (a value, --flag=value, a bad value, a flag) and global options before and after:
        what quick_args makes is what argparse makes, or it leaves argv to argparse."""
        attune.load_rest()
        commands = [c for c in attune.COMMANDS if len(c.path) == 2 and attune.quick_command(c.path)]
        self.assertGreaterEqual(len(commands), 20)
        self.assertIn(("pack", "list"), [c.path for c in commands])
        table = []
        for cmd in commands:
            variants = [[]]
            for flags, spec in cmd.arguments:
                kind, flag = spec.get("type"), flags[-1]
                if spec.get("action") == "store_true":
                    variants += [[flag], [flag + "=1"]]
                    continue
                good = list(spec.get("choices") or []) or [str(kind.low if kind.low is not None else 7)
                                                           if isinstance(kind, attune.Number) else "v a l"]
                variants += [[flag, good[0]], [flag, good[-1]], [flag], [flag, "-x"], [flag, "\u00b2"]]
                if flag.startswith("--"):
                    variants += [[flag + "=" + good[0]], [flag[:-1], good[0]]]  # the last: an abbreviation
            for head in ([], ["-j"], ["-p", "a", "--api-url", "http://h:1"]):
                for tail in ([], ["-y"], ["extra"]):
                    table += [head + list(cmd.path) + v + tail for v in variants]
        random.Random(7).shuffle(table)
        quick_ones = self.quick_ones_agree(table)
        self.assertGreater(quick_ones, len(sampled(table)) // 4)
        for cmd in commands:
            self.assertIsNotNone(attune.quick_args(list(cmd.path)), cmd.path)

    def test_every_state_gives_auth_token_the_token_requests_send(self):
        """Profiles with distinct tokens, -p, ATTUNE_PROFILE, environment tokens, token files
        and malformed files: `auth token` prints exactly the token `auth whoami` sends, or
        both fail with the same exit code and nothing on stdout."""
        token_file = os.path.join(self.tmp, "token")
        now = int(time.time())
        env_token = self.server.mint("admin", iat=now - 10)
        file_token = self.server.mint("admin", iat=now - 20)
        every_state = [(flag, profile_env, token_env, file_state)
                       for flag in ([], ["-p", "a"], ["-p", "b"], ["-p", "nope"])
                       for profile_env in (None, "b", "nope")
                       for token_env, file_state in ((None, None), (None, "missing"), (None, "empty"),
                                                     (None, "valid"), (env_token, None), (env_token, "valid"))]
        some_states = [([], None, None, None), (["-p", "b"], None, None, None), ([], "b", None, "valid"),
                       ([], None, env_token, None), (["-p", "a"], None, None, "empty")]
        layouts = (
            ("two profiles", None, every_state),
            ("version as text", lambda doc: doc.update(version="1"), some_states),
            ("no api_url", lambda doc: doc["profiles"]["b"].pop("api_url"), some_states),
            ("api_url a number", lambda doc: doc["profiles"]["b"].update(api_url=8080), some_states),
            ("profile not an object", lambda doc: doc["profiles"].update(b="x"), some_states),
            ("token not text", lambda doc: doc["profiles"]["b"].update(auth_token=5), some_states),
            ("current unknown", lambda doc: doc.update(current_profile="gone"), some_states),
            ("no file", lambda doc: None, some_states),
        )
        printed_tokens, stored = set(), set()
        for layout, change, states in layouts:
            if os.path.exists(self.config):
                os.unlink(self.config)
            pair = {self.seed(name, access_left=3000 - 500 * i, current=name == "a")["auth_token"]
                    for i, name in enumerate(("a", "b"))}
            self.assertEqual(len(pair), 2)  # the profiles hold distinct tokens
            stored |= pair
            if change:
                doc = self.read_doc()
                change(doc)
                self.write_doc(doc)
            if layout == "no file":
                os.unlink(self.config)
            for flag, profile_env, token_env, file_state in states:
                env = {"ATTUNE_PROFILE": profile_env, "ATTUNE_API_TOKEN": token_env,
                       "ATTUNE_TOKEN_FILE": None if file_state is None else token_file}
                if file_state in ("empty", "valid"):
                    with open(token_file, "w") as f:
                        f.write(file_token + "\n" if file_state == "valid" else "")
                elif os.path.exists(token_file):
                    os.unlink(token_file)
                argv = flag + ["--api-url", self.server.url]
                printed = self.run_cli(*(argv + ["auth", "token"]), env=env, secrets_ok=True)
                before = len(self.server.requests)
                sent = self.run_cli(*(argv + ["auth", "whoami"]), env=env)
                seen = [r.token for r in self.server.requests[before:] if r.path == "/auth/me"]
                case = (layout, tuple(flag), profile_env, token_env is not None, file_state)
                self.assertEqual(printed.code, sent.code, (case, printed, sent))
                if printed.code == 0:
                    self.assertEqual([printed.out], [t + "\n" for t in seen], case)
                    printed_tokens.add(printed.out.strip())
                else:
                    self.assertEqual(printed.out, "", case)
        self.assertIn(env_token, printed_tokens)
        self.assertIn(file_token, printed_tokens)
        self.assertGreaterEqual(len(printed_tokens & stored), 2)  # both profiles, by -p and by ATTUNE_PROFILE

    def test_shell_quote_is_shlex_quote(self):
        import shlex
        for text in ("", "plain", "a b", "it's", "http://x:1/p?q=1&r", "$(rm -rf)", "ü", "a\\nb"):
            self.assertEqual(attune.shell_quote(text), shlex.quote(text), text)

    def test_version_and_help(self):
        result = self.run_process("--version")
        self.assertEqual(result.out, "attune.py %s (python %d.%d)\n"
                         % ((attune.__version__,) + tuple(sys.version_info[:2])))
        self.assertEqual(result.out, self.ok("--version").out)
        self.assertEqual(self.ok("-p", "x", "--version").out, result.out)  # through argparse
        quick = self.run_process("--help", env={"COLUMNS": "100"}).out
        self.assertEqual(self.run_process("-p", "x", "--help", env={"COLUMNS": "100"}).out, quick)
        for name in attune.TOP_LEVEL + ["--profile NAME", "--wait-for-server SECONDS", "ATTUNE_TOKEN_FILE"]:
            self.assertIn(name, quick)
        self.assertTrue(all(len(line) <= 100 for line in quick.splitlines()), quick)

    @unittest.skipUnless(sys.version_info >= (3, 7) and sys.implementation.name == "cpython", "-X importtime")
    def test_quick_commands_import_no_parser_and_no_http_stack(self):
        token = self.seed()["auth_token"]
        env = self.process_env()
        for argv, out in ((["auth", "token"], token + "\n"), (["--version"], None), (["--help"], None),
                          (["__complete", "--", "pack", "l"], "list\n"), (["__complete", "--", "-p", ""], "default\n")):
            # -S keeps site hooks of this machine (a .pth importing certifi and urllib) out of the picture
            p = subprocess.Popen([sys.executable, "-S", "-X", "importtime", ATTUNE_PY] + argv, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
            stdout, err = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, err)
            if out is not None:
                self.assertEqual(stdout, out)
            imported = {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
            self.assertTrue(imported, err)
            for module in ("urllib", "urllib.request", "http", "http.client", "ssl", "email", "socket", "argparse",
                           "json", "re", "shlex", "gettext"):
                self.assertNotIn(module, imported, argv)


class JsonReaderTests(unittest.TestCase):
    """parse_json (credential file, JWTs) accepts exactly what json.loads with NaN refused does,
    and so does read_json, the credential file's reader, when a large file takes the C parser."""

    def random_value(self, rng, depth=0):
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([True, False, None])
        if kind == 1:
            return rng.randrange(-10 ** rng.randrange(1, 20), 10 ** rng.randrange(1, 20))
        if kind == 2:
            return rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-30, 30)
        if kind in (3, 4, 5):
            alphabet = 'ab "\\/\b\f\n\r\t\x00\x1f\x7fé\u2028\ud800\U0001f600'
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
        if kind in (6, 7):
            return [self.random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {"k%d" % rng.randrange(5): self.random_value(rng, depth + 1) for _ in range(rng.randrange(4))}

    def same(self, text):
        try:
            expected = ("ok", json.loads(text, parse_constant=attune.refuse_constant))
        except (ValueError, RecursionError):
            expected = ("error",)
        try:
            got = ("ok", attune.parse_json(text))
        except ValueError:
            got = ("error",)
        self.assertEqual(got, expected, repr(text))
        large = text + " " * (attune.LARGE_JSON + 1 - len(text))  # the same document, past the threshold
        try:
            got = ("ok", attune.read_json(large))
        except ValueError:
            got = ("error",)
        self.assertEqual(got, expected, repr(text))

    def test_generated_documents(self):
        rng = random.Random(7)
        for _ in range(400):
            value = self.random_value(rng)
            for text in (json.dumps(value), json.dumps(value, indent=rng.choice([None, 2, "\t"]), ensure_ascii=False)):
                self.same(text)

    def test_every_prefix_and_mutation(self):
        rng = random.Random(11)
        doc = json.dumps({"version": 1, "profiles": {"p": {"auth_token": "a.b.c", "n": [1, -2.5e3, None, True],
                                                           "s": "q\\u00e9\"\n"}}}, indent=2)
        for end in range(len(doc) + 1):
            self.same(doc[:end])
        pieces = ["NaN", "Infinity", "-Infinity", ",", "]", "}", "\x00", "'", "01", "1.", ".5", "1e", "+1", "--1",
                  "\\u12", "\\x", "\\ud83d\\ude00", "\\ud83d", "\t", "\u00a0", "tru", "nul", "[1,]", "{\"a\":1,}", "1e400"]
        for _ in range(3000):
            at = rng.randrange(len(doc) + 1)
            self.same(doc[:at] + rng.choice(pieces) + doc[at + rng.randrange(3):])
        for text in ("", " ", "[]", "{}", '"x"', "0", "-0", "-0.0", "1E+2", "[" * 50 + "]" * 50, '{"a":1,"a":2}',
                     '"\\ud800"', "1 2", "[1 2]", '{"a" 1}', '{1: 2}', "\ufeff{}"):
            self.same(text)

    def test_deep_nesting_is_an_error_not_a_crash(self):
        for read in (attune.parse_json, attune.read_json):
            with self.assertRaises(ValueError):
                read("[" * 100000 + "]" * 100000)

    def test_the_reader_each_size_takes(self):
        calls = []
        with mock.patch.object(attune, "parse_json", lambda text: calls.append("hand") or {}), \
                mock.patch.object(attune, "json_loads", lambda text: calls.append("C") or {}):
            attune.read_json("{}")
            attune.read_json("{}" + " " * attune.LARGE_JSON)
        self.assertEqual(calls, ["hand", "C"])


# In the shape of packs/core in attune-system/attune (written for these tests).
WORKFLOW_YAML = """\
# Deploy Service Workflow
# Rolls a service out to every host, checking each step

name: deploy_service
ref: ops.deploy_service
label: "Deploy Service"
description: "Roll a service out with health checks: {{ parameters.service }}"
version: "2.1.0"

# Input parameters (inline required/secret)
parameters:
  hosts:
    type: array
    items:
      type: string
    minItems: 1
    required: true
  retries:
    type: integer
    default: 3
    minimum: 0
  ratio: {type: number, default: 0.5}
  token:
    type: string
    secret: true

vars:
  - started: null
  - done_hosts: []

tasks:
  # Task 1
  - name: prepare
    action: core.noop
    input:
      message: "Preparing {{ parameters.hosts | length }} host(s)"
    publish:
      - started: "{{ now() }}"
    on_success: roll_out

  - name: roll_out
    action: ops.roll
    with_items: "{{ parameters.hosts }}"
    input:
      host: "{{ item }}"
      filter: "{{ workflow.hosts | map(attribute='name') | list }}"
    on_failure:
      - when: "{{ parameters.retries > 0 }}"
        do:
          - when: "{{ result.code == 75 }}"
            next: roll_out
          - next: give_up
      - when: '{{ parameters.retries == 0 }}'
        do: give_up

  - name: give_up
    action: core.echo
    input: {message: 'Giving up: it''s broken'}

output_schema:
  summary:
    type: object
    properties:
      hosts_done: {type: integer}

metadata:
  description: |
    Rolls the service out host by host:

    1. Prepare: count the hosts
    2. Roll out: one host at a time
      - retried on code 75

  notes: >
    Folded text joins
    its lines.

    A blank line is a break.
  tags: [deploy, ops,
         "rolling"]
  weight: -1.5e+2
  enabled: true
  empty:
"""
WORKFLOW_DATA = {'name': 'deploy_service',
 'ref': 'ops.deploy_service',
 'label': 'Deploy Service',
 'description': 'Roll a service out with health checks: {{ parameters.service }}',
 'version': '2.1.0',
 'parameters': {'hosts': {'type': 'array', 'items': {'type': 'string'}, 'minItems': 1, 'required': True},
                'retries': {'type': 'integer', 'default': 3, 'minimum': 0},
                'ratio': {'type': 'number', 'default': 0.5},
                'token': {'type': 'string', 'secret': True}},
 'vars': [{'started': None}, {'done_hosts': []}],
 'tasks': [{'name': 'prepare',
            'action': 'core.noop',
            'input': {'message': 'Preparing {{ parameters.hosts | length }} host(s)'},
            'publish': [{'started': '{{ now() }}'}],
            'on_success': 'roll_out'},
           {'name': 'roll_out',
            'action': 'ops.roll',
            'with_items': '{{ parameters.hosts }}',
            'input': {'host': '{{ item }}', 'filter': "{{ workflow.hosts | map(attribute='name') | list }}"},
            'on_failure': [{'when': '{{ parameters.retries > 0 }}',
                            'do': [{'when': '{{ result.code == 75 }}', 'next': 'roll_out'},
                                   {'next': 'give_up'}]},
                           {'when': '{{ parameters.retries == 0 }}', 'do': 'give_up'}]},
           {'name': 'give_up', 'action': 'core.echo', 'input': {'message': "Giving up: it's broken"}}],
 'output_schema': {'summary': {'type': 'object', 'properties': {'hosts_done': {'type': 'integer'}}}},
 'metadata': {'description': 'Rolls the service out host by host:\n'
                             '\n'
                             '1. Prepare: count the hosts\n'
                             '2. Roll out: one host at a time\n'
                             '  - retried on code 75\n',
              'notes': 'Folded text joins its lines.\nA blank line is a break.\n',
              'tags': ['deploy', 'ops', 'rolling'],
              'weight': -150.0,
              'enabled': True,
              'empty': None}}
PERMISSION_SET_YAML = """\
ref: ops.operator
label: Operator
description: Run and watch deployments.
grants:
  - resource: packs
    actions: [read]
  - resource: executions
    actions: [read, update, cancel]
  - resource: caches
    actions: [read]
    constraints:
      owner_types: [pack]
      owner_refs: ["ops"]
"""
PERMISSION_SET_DATA = {'ref': 'ops.operator',
 'label': 'Operator',
 'description': 'Run and watch deployments.',
 'grants': [{'resource': 'packs', 'actions': ['read']},
            {'resource': 'executions', 'actions': ['read', 'update', 'cancel']},
            {'resource': 'caches',
             'actions': ['read'],
             'constraints': {'owner_types': ['pack'], 'owner_refs': ['ops']}}]}

# Examples from the YAML 1.2.2 specification (chapters 2, 5-8) inside the subset attune.py
# reads, with the values the specification gives for them.
YAML_SPEC_EXAMPLES = [
    ("- Mark McGwire\n- Sammy Sosa\n- Ken Griffey\n", ["Mark McGwire", "Sammy Sosa", "Ken Griffey"]),  # 2.1
    ("hr:  65    # Home runs\navg: 0.278 # Batting average\nrbi: 147   # Runs Batted In\n",
     {"hr": 65, "avg": 0.278, "rbi": 147}),  # 2.2
    ("american:\n- Boston Red Sox\n- Detroit Tigers\nnational:\n- New York Mets\n- Chicago Cubs\n",
     {"american": ["Boston Red Sox", "Detroit Tigers"], "national": ["New York Mets", "Chicago Cubs"]}),  # 2.3
    ("-\n  name: Mark McGwire\n  hr:   65\n-\n  name: Sammy Sosa\n  hr:   63\n",
     [{"name": "Mark McGwire", "hr": 65}, {"name": "Sammy Sosa", "hr": 63}]),  # 2.4
    ("- [name        , hr, avg  ]\n- [Mark McGwire, 65, 0.278]\n",
     [["name", "hr", "avg"], ["Mark McGwire", 65, 0.278]]),  # 2.5
    ("Mark McGwire: {hr: 65, avg: 0.278}\nSammy Sosa: {\n    hr: 63,\n    avg: 0.288,\n }\n",
     {"Mark McGwire": {"hr": 65, "avg": 0.278}, "Sammy Sosa": {"hr": 63, "avg": 0.288}}),  # 2.6
    ("---\n# Products purchased\n- item    : Super Hoop\n  quantity: 1\n- item    : Basketball\n  quantity: 4\n",
     [{"item": "Super Hoop", "quantity": 1}, {"item": "Basketball", "quantity": 4}]),  # 2.12
    ("# ASCII Art\n--- |\n  \\//||\\/||\n  // ||  ||__\n", "\\//||\\/||\n// ||  ||__\n"),  # 2.13
    (">\n  Mark McGwire's\n  year was crippled\n  by a knee injury.\n",
     "Mark McGwire's year was crippled by a knee injury.\n"),  # 2.14
    (">\n Sammy Sosa completed another\n fine season with great stats.\n\n   63 Home Runs\n"
     "   0.288 Batting Average\n\n What a year!\n",
     "Sammy Sosa completed another fine season with great stats.\n\n  63 Home Runs\n"
     "  0.288 Batting Average\n\nWhat a year!\n"),  # 2.15
    ("name: Mark McGwire\naccomplishment: >\n  Mark set a major league\n  home run record in 1998.\n"
     "stats: |\n  65 Home Runs\n  0.278 Batting Average\n",
     {"name": "Mark McGwire", "accomplishment": "Mark set a major league home run record in 1998.\n",
      "stats": "65 Home Runs\n0.278 Batting Average\n"}),  # 2.16
    ('unicode: "Sosa did fine.\\u263A"\ncontrol: "\\b1998\\t1999\\t2000\\n"\nhex esc: "\\x0d\\x0a is \\r\\n"\n\n'
     "single: '\"Howdy!\" he cried.'\nquoted: ' # Not a ''comment''.'\ntie-fighter: '|\\-*-/|'\n",
     {"unicode": "Sosa did fine.\u263a", "control": "\b1998\t1999\t2000\n", "hex esc": "\r\n is \r\n",
      "single": '"Howdy!" he cried.', "quoted": " # Not a 'comment'.", "tie-fighter": "|\\-*-/|"}),  # 2.17
    ('plain:\n  This unquoted scalar\n  spans many lines.\n\nquoted: "So does this\n  quoted scalar.\\n"\n',
     {"plain": "This unquoted scalar spans many lines.", "quoted": "So does this quoted scalar.\n"}),  # 2.18
    ("canonical: 12345\ndecimal: +12345\noctal: 0o14\nhexadecimal: 0xC\n",
     {"canonical": 12345, "decimal": 12345, "octal": 12, "hexadecimal": 12}),  # 2.19
    ("canonical: 1.23015e+3\nexponential: 12.3015e+02\nfixed: 1230.15\nnegative infinity: -.inf\n",
     {"canonical": 1230.15, "exponential": 1230.15, "fixed": 1230.15, "negative infinity": float("-inf")}),  # 2.20
    ("null:\nbooleans: [ true, false ]\nstring: '012345'\n",
     {"null": None, "booleans": [True, False], "string": "012345"}),  # 2.21
    ("sequence: [ one, two, ]\nmapping: { sky: blue, sea: green }\n",
     {"sequence": ["one", "two"], "mapping": {"sky": "blue", "sea": "green"}}),  # 5.4
    ("# Comment only.\n", None),  # 5.5
    ("|\n  Line break (no glyph)\n  Line break (glyphed)\n", "Line break (no glyph)\nLine break (glyphed)\n"),  # 5.11
    ("# Tabs and spaces\nquoted: \"Quoted \t\"\nblock:\t|\n  void main() {\n  \tprintf(\"Hello, world!\\n\");\n  }\n",
     {"quoted": "Quoted \t", "block": 'void main() {\n\tprintf("Hello, world!\\n");\n}\n'}),  # 5.12
    ('"Fun with \\\\\n\\" \\a \\b \\e \\f \\\n\\n \\r \\t \\v \\0 \\\n\\  \\_ \\N \\L \\P \\\n\\x41 \\u0041 \\U00000041"',
     "Fun with \x5c \x22 \x07 \x08 \x1b \x0c \x0a \x0d \x09 \x0b \x00 \x20 \xa0 \x85 \u2028 \u2029 A A A"),  # 5.13
    ("  # Leading comment line spaces are\n   # neither content nor indentation.\n    \nNot indented:\n"
     " By one space: |\n    By four\n      spaces\n Flow style: [    # Leading spaces\n   By two,        # in flow style\n"
     "  Also by two,    # are neither\n  \tStill by two   # content nor\n    ]             # indentation.\n",
     {"Not indented": {"By one space": "By four\n  spaces\n",
                       "Flow style": ["By two", "Also by two", "Still by two"]}}),  # 6.1
    ("plain: text\n  lines\nquoted: \"text\n  \tlines\"\nblock: |\n  text\n   \tlines\n",
     {"plain": "text lines", "quoted": "text lines", "block": "text\n \tlines\n"}),  # 6.5
    (">-\n  trimmed\n  \n \n\n  as\n  space", "trimmed\n\n\nas space"),  # 6.6
    ("key:    # Comment\n        # lines\n  value\n\n", {"key": "value"}),  # 6.11
    ('"folded \nto a space,\t\n \nto a line feed, or \t\\\n \\ \tnon-content"',
     "folded to a space,\nto a line feed, or \t \tnon-content"),  # 7.5
    ('" 1st non-empty\n\n 2nd non-empty \n\t3rd non-empty "', " 1st non-empty\n2nd non-empty 3rd non-empty "),  # 7.6
    ("'here''s to \"quotes\"'", "here's to \"quotes\""),  # 7.7
    ("' 1st non-empty\n\n 2nd non-empty \n\t3rd non-empty '", " 1st non-empty\n2nd non-empty 3rd non-empty "),  # 7.9
    ("1st non-empty\n\n 2nd non-empty \n\t3rd non-empty", "1st non-empty\n2nd non-empty 3rd non-empty"),  # 7.12
    ("- [ one, two, ]\n- [three ,four]\n", [["one", "two"], ["three", "four"]]),  # 7.13
    ("- { one : two , three: four , }\n- {five: six,seven : eight}\n",
     [{"one": "two", "three": "four"}, {"five": "six", "seven": "eight"}]),  # 7.15
    ("{\nunquoted\u00a0: \"separate\",\n\"omitted value\":,\n}\n", {"unquoted\u00a0": "separate", "omitted value": None}),
    ("- | # Empty header\n literal\n- >1 # Indentation indicator\n  folded\n- |+ # Chomping indicator\n keep\n\n"
     "- >1- # Both indicators\n  strip\n", ["literal\n", " folded\n", "keep\n\n", " strip"]),  # 8.1
    ("strip: |-\n  text\nclip: |\n  text\nkeep: |+\n  text\n", {"strip": "text", "clip": "text\n", "keep": "text\n"}),
    (" # Strip\n  # Comments:\nstrip: |-\n  # text\n  \n # Clip\n  # comments:\n\nclip: |\n  # text\n \n # Keep\n"
     "  # comments:\n\nkeep: |+\n  # text\n\n # Trail\n  # comments.\n",
     {"strip": "# text", "clip": "# text\n", "keep": "# text\n\n"}),  # 8.5
    ("strip: >-\n\nclip: >\n\nkeep: |+\n\n", {"strip": "", "clip": "", "keep": "\n"}),  # 8.6
    ("|\n literal\n \ttext\n\n", "literal\n\ttext\n"),  # 8.7
    ("|\n \n  \n  literal\n   \n  \n  text\n\n # Comment\n", "\n\nliteral\n \n\ntext\n"),  # 8.8
    (">\n\n folded\n line\n\n next\n line\n   * bullet\n\n   * list\n   * lines\n\n last\n line\n\n# Comment\n",
     "\nfolded line\nnext line\n  * bullet\n\n  * list\n  * lines\n\nlast line\n"),  # 8.10
    ("block sequence:\n  - one\n  - two : three\n", {"block sequence": ["one", {"two": "three"}]}),  # 8.14
    ("- # Empty\n- |\n block node\n- - one # Compact\n  - two # sequence\n- one: two # Compact mapping\n",
     [None, "block node\n", ["one", "two"], {"one": "two"}]),  # 8.15
    ("block mapping:\n key: value\n", {"block mapping": {"key": "value"}}),  # 8.16
    ('plain key: in-line value\n: # Both empty\n"quoted key":\n- entry\n', None),  # 8.18: an empty key: refused below
    ("- sun: yellow\n- ? earth: blue\n  : moon: white\n", None),  # 8.19: complex keys: refused below
]
YAML_SPEC_EXAMPLES = [(text, value) for text, value in YAML_SPEC_EXAMPLES if value is not None or "Comment only" in text]


class YamlReaderTests(unittest.TestCase):
    """yaml_loads: the subset Attune's files use, JSON, and errors with line:column."""

    def test_files_in_the_shape_of_attune_packs(self):
        # Written after packs/core in attune-system/attune: workflow, action and permission
        # set files (comments, quoted templates, nested task lists, | and > blocks, flow lists).
        self.assertEqual(attune.yaml_loads(WORKFLOW_YAML), WORKFLOW_DATA)
        self.assertEqual(attune.yaml_loads(PERMISSION_SET_YAML), PERMISSION_SET_DATA)
        self.assertEqual(attune.yaml_loads(WORKFLOW_YAML.replace("\n", "\r\n")), WORKFLOW_DATA)
        self.assertEqual(attune.yaml_loads("\ufeff---\n" + PERMISSION_SET_YAML + "...\n"), PERMISSION_SET_DATA)

    def test_examples_of_the_yaml_spec(self):
        for text, expected in YAML_SPEC_EXAMPLES:
            with self.subTest(text=text):
                self.assertEqual(attune.yaml_loads(text), expected)

    def test_core_schema_scalars(self):
        for text, expected in (("~", None), ("null", None), ("Null", None), ("NULL", None), ("", None),
                               ("true", True), ("True", True), ("TRUE", True), ("false", False), ("FALSE", False),
                               ("yes", "yes"), ("no", "no"), ("on", "on"), ("y", "y"), ("tRue", "tRue"),
                               ("0", 0), ("-17", -17), ("+5", 5), ("007", 7), ("0o17", 15), ("0x1f", 31),
                               ("0x", "0x"), ("0o8", "0o8"), ("1_000", "1_000"), ("1:20", "1:20"),
                               ("1.5", 1.5), ("-.5", -0.5), ("1.", 1.0), ("1e3", 1000.0), ("1.2E-2", 0.012),
                               ("+1e+3", 1000.0), (".inf", float("inf")), ("-.Inf", float("-inf")),
                               ("+.INF", float("inf")), ("inf", "inf"), ("1e", "1e"), (".", "."),
                               ("2026-11-29", "2026-11-29"), ("'1'", "1"), ('"true"', "true"),
                               ("a # comment", "a"), ("a#b", "a#b"), ("é ✓", "é ✓")):
            with self.subTest(text=text):
                self.assertEqual(attune.yaml_loads("v: " + text), {"v": expected})
        nan = attune.yaml_loads(".nan")
        self.assertNotEqual(nan, nan)

    def test_json_is_yaml(self):
        rng = random.Random(23)
        for _ in range(300):
            value = JsonReaderTests().random_value(rng)
            for text in (json.dumps(value), json.dumps(value, indent=rng.choice([None, 2, "\t"]), ensure_ascii=False)):
                with self.subTest(text=text):
                    try:
                        got = ("ok", attune.yaml_loads(text))
                    except attune.YamlError:
                        got = ("error",)
                    if "\\ud8" in text or "\\ud9" in text or "\\uda" in text or "\\udb" in text \
                            or "\\udc" in text or "\\udd" in text or "\\ude" in text or "\\udf" in text:
                        if got != ("ok", value):  # a lone surrogate escape is no character in YAML
                            self.assertEqual(got, ("error",))
                    else:
                        self.assertEqual(got, ("ok", value))

    def random_value(self, rng, depth=0):
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([True, False, None])
        if kind == 1:
            return rng.randrange(-10 ** rng.randrange(1, 20), 10 ** rng.randrange(1, 20))
        if kind == 2:
            return rng.choice([rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-30, 30), float("inf"), -0.0])
        words = ["", " ", "a", "a b", "- a", "-", "a:", "a: b", "a:b", "#", "a #b", "a#b", "'", '"', "\\", "|", ">",
                 "&a", "*a", "!a", "%", "@", "`", "?", "? a", "{", "}", "[", "]", ",", "~", "null", "Null", "true",
                 "False", "yes", "1", "-1", "0x1", "0o7", "1e3", ".5", ".inf", "-.inf", ".nan", "é", "\u2028",
                 "\U0001f600", "\t", "\n", "\r", "\x00", "\x1b[31m", "\x7f", "\x85", "\u202e", "---", "...", "  x"]
        if kind in (3, 4, 5):
            return "".join(rng.choice(words) for _ in range(rng.randrange(4)))
        if kind in (6, 7):
            return [self.random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(words): self.random_value(rng, depth + 1) for _ in range(rng.randrange(4))}

    def test_round_trip_with_the_output_emitter(self):
        rng = random.Random(29)
        for _ in range(600):
            value = self.random_value(rng)
            text = attune.to_yaml(value)
            with self.subTest(text=text):
                self.assertEqual(attune.yaml_loads(text), value)
                self.assertEqual(attune.yaml_loads(attune.to_yaml(value, ascii_only=True)), value)

    def test_outside_the_subset_is_an_error_with_line_and_column(self):
        for text, error in (
                ("a: &x 1\nb: *x", "1:4: anchors are not supported"),
                ("a: 1\nb: *x", "2:4: aliases are not supported"),
                ("!!map {a: 1}", "1:1: tags are not supported"),
                ("a: !secret x", "1:4: tags are not supported"),
                ("[!x a]", "1:2: tags are not supported"),
                ("%YAML 1.2\n---\na: 1", "1:1: directives are not supported"),
                ("a: 1\n---\nb: 2", "2:1: only one document is allowed"),
                ("a: 1\n...\nb: 2", "3:1: unexpected content after the document"),
                ("? a\n: b", "1:1: complex keys are not supported"),
                ("[a, b]: c", "1:1: complex keys are not supported"),
                ("{[a]: b}", "1:2: complex keys are not supported"),
                ("[a: b]", "1:3: key: value inside [ ] is not supported"),
                ("a: 1\na: 2", '2:1: duplicate key "a"'),
                ("{a: 1, 'a': 2}", '1:8: duplicate key "a"'),
                ("a:\n\tb: 1", "2:1: a tab cannot indent a line"),
                ("\t- a", "1:1: a tab cannot indent a line"),
                ("a: b\n\tc", "2:1: a tab cannot indent a line"),
                ("a: b: c", "1:4: a mapping cannot start on the line of its key"),
                ("a: - b", "1:4: a sequence cannot start on the line of its key"),
                ("a: b\n  c: d", "2:4: a mapping cannot start inside a value"),
                ("a:\n  b: 1\n    c: 2", "3:6: a mapping cannot start inside a value"),
                ("a:\n    b: 1\n  c: 2", "3:3: this line is indented more than the keys of its mapping"),
                ("- a\nb: c", "2:1: unexpected content after the document"),
                ("a: 1\n- b", "2:1: expected a key of the mapping above"),
                ("a: 'x", "1:4: this quoted scalar never ends"),
                ('a: "x\n---\n"', "1:4: this quoted scalar never ends"),
                ("a: [1, 2", "1:4: this sequence never ends"),
                ("{a: 1", "1:1: this mapping never ends"),
                ("[1 2 : 3]", "1:6: key: value inside [ ] is not supported"),
                ("[1, , 2]", "1:5: expected an entry"),
                ("[a] x", '1:5: unexpected "x"'),
                ("plain key: in-line value\n: # Both empty", '2:1: a plain scalar cannot start with ":"'),
                ("- sun: yellow\n- ? earth: blue\n  : moon: white", "2:3: complex keys are not supported"),
                ('"a" b', '1:5: unexpected "b" after the value'),
                ('a: "\\q"', "1:5: unknown escape \\q"),
                ('a: "\\x4"', "1:5: \\x needs 2 hexadecimal digits"),
                ('"\\ud800"', "1:2: \\ud800 is not a character"),
                ('"\\U00110000"', "1:2: \\U00110000 is not a character"),
                ("a: |x\n  b", "1:4: a block scalar's header"),
                ("a: |\n  \n   \n  b", "4:1: an empty line above the text is indented more than the text"),
                ("a: b\n  # note\n  c", "3:3: a comment cannot sit inside a multi-line value"),
                ("a: @b", '1:4: a plain scalar cannot start with "@"'),
                ("- `x`", '1:3: a plain scalar cannot start with "`"'),
                ("a: %x", '1:4: a plain scalar cannot start with "%"'),
                ("a: x\x00", "1:5: control character U+0000 is not allowed"),
                ("a:\n  - x\n\x1b[2J", "3:1: control character U+001B is not allowed"),
                ('a: "x"#c', '1:7: unexpected "#" after the value'),
                ("[" * 300, "1:200: nested more than 200 levels deep"),
                ("- " * 300, "1:401: nested more than 200 levels deep")):
            with self.subTest(text=text):
                with self.assertRaises(attune.YamlError) as caught:
                    attune.yaml_loads(text)
                self.assertTrue(str(caught.exception).startswith(error), "%r: %s" % (text, caught.exception))

    def test_mutations_are_a_value_or_a_yaml_error(self):
        rng = random.Random(31)
        pieces = list(" \t\n-:?#&*!|>'\",[]{}\\%@`~.0a") + ["\x00", "\x85", "é", "---", "...", "|+", ">-2", "- ",
                                                            ": ", "\n  ", "\\u", "\\x"]
        texts = [WORKFLOW_YAML[:1200], PERMISSION_SET_YAML] + [text for text, _ in YAML_SPEC_EXAMPLES]
        for _ in range(sum(sampled([1] * 9000))):
            text = rng.choice(texts)
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(text) + 1)
                text = text[:at] + rng.choice(pieces) + text[at + rng.randrange(3):]
            try:
                attune.yaml_loads(text)
            except attune.YamlError as e:
                self.assertRegex(str(e), r"^\d+:\d+: ", repr(text))


class HelpTests(unittest.TestCase):
    """What --help shows, built for every command from the declarations."""

    FIRST_GROUPS = ("auth", "config", "pack", "action", "run", "execution", "key")

    def help_of(self, words):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = attune.main(list(words) + ["--help"], environ={"HOME": "/nonexistent"})
            except SystemExit as e:
                code = e.code
        self.assertEqual((code, err.getvalue()), (0, ""), words)
        return out.getvalue()

    def test_each_watching_command_says_what_ctrl_c_and_ctrl_d_do(self):
        """Every command that can watch one execution says, in its --help, that Ctrl+C cancels
        it on the server and Ctrl+D leaves it running; the list watch, that Ctrl+C only ends it."""
        attune.load_rest()
        watching = [cmd.path for cmd in attune.COMMANDS if attune.WATCH_KEYS == cmd.note]
        self.assertEqual(sorted(watching), [("action", "execute"), ("execution", "rerun"), ("run",)])
        for path in watching + [("execution", "watch")]:
            text = " ".join(self.help_of(path).split())
            self.assertIn("Ctrl+C asks the server to cancel", text, path)
            self.assertIn("Ctrl+D, when stdin is the terminal, stops watching and leaves it running", text, path)
        self.assertIn("Following a list, Ctrl+C only ends the watch.", " ".join(self.help_of(("execution", "watch"))
                                                                               .split()))

    def every_path(self):
        attune.load_rest()
        groups = [(name,) for name in attune.TOP_LEVEL if name in attune.GROUP_HELP]
        above = {cmd.path[:i] for cmd in attune.COMMANDS for i in range(2, len(cmd.path))}
        return groups + sorted(above - {cmd.path for cmd in attune.COMMANDS}) + [cmd.path for cmd in attune.COMMANDS]

    def typed(self, path):
        """The words that reach path: a placeholder for each positional of a command above it."""
        return ["x" if word.isupper() else word for word in attune.command_words(path)]

    def examples(self, text):
        lines = text.split("\n")
        if "examples:" not in lines:
            return []
        at = lines.index("examples:") + 1
        return [line.strip() for line in lines[at:lines.index("", at)]]

    def test_every_flag_and_argument_has_a_help_line(self):
        attune.load_rest()
        for cmd in attune.COMMANDS:
            for flags, spec in cmd.arguments:
                with self.subTest(command=" ".join(cmd.path), flags=flags):
                    self.assertTrue(spec.get("help"))
        for flags, spec in attune.GLOBAL_OPTIONS:
            self.assertTrue(spec.get("help"), flags)

    def test_usage_is_the_commands_own_and_the_global_options_are_told_once(self):
        """Each usage line names the command as it is typed, its own options and
        [global options], never the global options themselves; its help lists only its own
        options and ends with one line naming the global ones and `attune help global`."""
        globals_ = [flag for flags, _ in attune.GLOBAL_OPTIONS for flag in flags if flag.startswith("--")]
        for path in self.every_path():
            with self.subTest(path=path):
                text = self.help_of(self.typed(path))
                usage = text[:text.index("\n\n")]
                self.assertTrue(usage.startswith("usage: attune %s " % " ".join(attune.command_words(path))), usage)
                self.assertIn("[global options]", usage)
                cmd = attune.find_command(path)
                own = {flag for flags, _ in (cmd.arguments if cmd else ()) for flag in flags}
                for flag in globals_:
                    if flag not in own:
                        self.assertNotIn(flag + " ", usage.replace("]", " "))
                        self.assertNotIn("  " + flag, text[:text.index("global options (before")])  # no row
                for flags, spec in (cmd.arguments if cmd else ()):
                    if flags[0].startswith("-"):
                        self.assertIn(flags[0], usage)
                self.assertIn("see attune help global", text)
                self.assertNotIn("program's version number", text)
                for line in usage.split("\n")[1:]:  # longer only when one word is (a list of choices)
                    self.assertTrue(len(line) <= attune.help_width() or line.strip().count(" [") == 0, line)
        top = self.help_of([])
        self.assertIn("--version             show the version and exit", top)
        for flags, spec in attune.GLOBAL_OPTIONS:
            self.assertIn(spec["help"].split()[0], top)

    def test_examples_parse_as_the_command_they_stand_under(self):
        """Every example is a command line argparse takes, naming the command whose help shows
        it (a group's: one of its commands). The commands a user meets first show two or
        more in their group's help and one or more each; every other group shows one."""
        call = re.compile(r"(?:^|\$\(|<\()(?:sudo )?(?:python3 )?attune(?:\.py)? ([^)#<|]*)")
        self.assertGreaterEqual(len(self.examples(self.help_of(()))), 4)  # the top level's, parsed below
        for path in [()] + self.every_path():
            text = self.help_of(self.typed(path))
            examples = self.examples(text)
            with self.subTest(path=path):
                group = path[0] if path else None
                if len(path) == 1 and attune.find_command(path) is None:
                    self.assertGreaterEqual(len(examples), 2 if group in self.FIRST_GROUPS else 1)
                elif group in self.FIRST_GROUPS and attune.find_command(path) is not None:
                    self.assertGreaterEqual(len(examples), 2 if path == ("run",) else 1)
                for example in examples:
                    calls = call.findall(example)
                    self.assertTrue(calls, example)
                    for words in calls:
                        argv = shlex.split(words)
                        with contextlib.redirect_stderr(io.StringIO()) as err:
                            try:
                                args = attune.parse_args(argv)
                            except (SystemExit, attune.UsageError) as e:
                                self.fail("%s: %s %s" % (example, e, err.getvalue()))
                        if argv[:1] != ["help"]:
                            self.assertEqual(tuple(args.command_path[:len(path)]), path, example)

    def test_help_global_and_help_of_a_command(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(attune.main(["help", "global"], environ={"HOME": "/nonexistent"}), 0)
        for flags, spec in attune.GLOBAL_OPTIONS:
            self.assertIn(", ".join(flags) if spec.get("action") in attune.FLAG_ACTIONS else flags[-1], out.getvalue())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                attune.main(["help", "pack", "list"], environ={"HOME": "/nonexistent"})
            except SystemExit as e:
                self.assertEqual(e.code, 0)
        self.assertEqual(out.getvalue(), self.help_of(["pack", "list"]))
        for topic, first in (("environment", "environment:"), ("exit-codes", "exit codes:"), ("", "usage: attune")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(attune.main(["help"] + ([topic] if topic else []), environ={}), 0)
            self.assertTrue(out.getvalue().startswith(first), topic)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(attune.main(["help", "pakc"], environ={}), 2)
        self.assertIn("did you mean 'pack'?", err.getvalue())


class ParserTests(unittest.TestCase):
    def parse(self, argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                return attune.parse_args(argv), ""
            except SystemExit:
                return None, err.getvalue()
            except attune.UsageError as e:  # a word with no place, said before argparse runs
                return None, str(e)

    def test_an_argument_is_declared_as_its_help_shows_it(self):
        """arg('flags METAVAR: help', **options): the flags (or a positional argument's one
        name), at most one metavar, and the help after the first ': ' (which may hold more)."""
        for spec, options, declared in (
                ("--all: follow every page", {"action": "store_true"},
                 (("--all",), {"action": "store_true", "help": "follow every page"})),
                ("-n --name NAME: the name: pack.name", {}, (("-n", "--name"), {"metavar": "NAME",
                                                                                 "help": "the name: pack.name"})),
                ("ref REF: rule reference", {}, (("ref",), {"metavar": "REF", "help": "rule reference"})),
                ("--fields A,B", {}, (("--fields",), {"metavar": "A,B"})),
                ("id", {"nargs": "?"}, (("id",), {"nargs": "?"})),
                ("-v --verbose: ", {"action": "count"}, (("-v", "--verbose"), {"action": "count", "help": ""}))):
            with self.subTest(spec=spec):
                self.assertEqual(attune.arg(spec, **options), declared)
        self.assertEqual(attune.flag("--yes: do not ask"), (("--yes",), {"action": "store_true", "help": "do not ask"}))
        declared = [a for cmd in attune.COMMANDS for a in cmd.arguments] + list(attune.GLOBAL_OPTIONS)
        self.assertEqual([a for a in declared if isinstance(a, str)], [])  # made (flags, options) as declared
        wrong = [flags for flags, _ in declared  # a second metavar would be taken for a flag
                 if not (len(flags) == 1 or all(flag.startswith("-") for flag in flags))]
        self.assertEqual(wrong, [])
        self.assertEqual(attune.arg("--name NAME MORE")[0], ("--name", "NAME"))  # what that check finds

    def test_every_duration_takes_a_unit_through_the_one_parser(self):
        """Each option of seconds (every SECONDS metavar, the policy window, the action
        timeout) takes 30, 30s, 5m and 1h alike; anything else is refused with the forms."""
        durations = [(cmd, flags, spec) for cmd in attune.COMMANDS for flags, spec in cmd.arguments
                     if isinstance(spec.get("type"), attune.Seconds)]
        durations += [(None, flags, spec) for flags, spec in attune.GLOBAL_OPTIONS
                      if isinstance(spec.get("type"), attune.Seconds)]
        self.assertGreaterEqual(len(durations), 10)
        for flags, spec in ((f, s) for c, f, s in durations if s.get("metavar") == "SECONDS"):
            self.assertIsInstance(spec["type"], attune.Seconds, flags)
        for cmd, flags, spec in durations:
            kind = spec["type"]
            for text, seconds in (("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("2M", 120)):
                with self.subTest(flags=flags, text=text):
                    self.assertEqual(kind(text), seconds)
            for text in ("5x", "m", "", "1.5.m", "5 m", "٣m"):
                with self.subTest(flags=flags, text=text):
                    with self.assertRaises(attune.argparse.ArgumentTypeError) as caught:
                        kind(text)
                    self.assertIn("seconds (30, 30s, 5m or 1h)", str(caught.exception))
        for name in ("ATTUNE_TIMEOUT", "ATTUNE_LOCK_TIMEOUT"):
            self.assertEqual(attune.env_seconds({name: "2m"}, name, 1, 0), 120)
            self.assertEqual(attune.env_seconds({name: "1.5"}, name, 1, 0), 1.5)
            with self.assertRaises(attune.ConfigError):
                attune.env_seconds({name: "soon"}, name, 1, 0)
        args = attune.parse_args(["execution", "watch", "--timeout", "5m"])
        self.assertEqual(args.timeout, 300)
        self.assertEqual(attune.quick_args(["auth", "token", "--min-ttl", "5m"]).min_ttl, 300)  # the quick path too
        self.assertIsNone(attune.quick_args(["auth", "token", "--min-ttl", "5x"]))  # argparse says what is wrong

    def test_o_is_output_except_where_a_command_has_its_own(self):
        self.assertEqual(attune.parse_args(["-o", "json", "pack", "list"]).output, "json")
        self.assertEqual(attune.parse_args(["pack", "list", "-o", "yaml"]).output, "yaml")
        args = attune.parse_args(["artifact", "download", "1", "-o", "file.bin"])
        self.assertEqual(args.target, "file.bin")
        self.assertEqual(attune.parse_args(["-o", "json", "artifact", "download", "1"]).output, "json")

    def test_a_command_above_its_own_lists_them_all(self):
        """Each command that only stands above its own (`cache entry`) says, run alone,
        exactly the commands declared below it, with exit 2."""
        attune.load_rest()
        above = [c for c in attune.COMMANDS if c.func is attune.needs_a_command]
        self.assertGreaterEqual(len(above), 10)
        for cmd in above:
            with self.subTest(cmd.path):
                positionals = [spec.get("metavar") for flags, spec in cmd.arguments if not flags[0].startswith("-")]
                args, err = self.parse(list(cmd.path) + ["x"] * len(positionals))
                self.assertEqual(err, "")
                with self.assertRaises(attune.UsageError) as caught:
                    args.func(None, args)
                names = [name for name, _, _ in attune.children(cmd.path)]
                message = str(caught.exception)
                self.assertTrue(message.startswith(" ".join(list(cmd.path) + positionals) + " needs a command: "),
                                message)
                listed, see = message.split(": ", 1)[1].split(" (see: ")
                self.assertEqual(listed.replace(" or ", ", ").split(", "), names)
                self.assertEqual(see, "attune %s --help)" % " ".join(cmd.path))
                self.assertEqual(caught.exception.exit_code, 2)

    def test_only_the_named_command_is_filled_in(self):
        filled = []
        real = attune.add_global_args
        with mock.patch.object(attune, "add_global_args", lambda p, top, **kw: (filled.append(p.prog), real(p, top, **kw))):
            for argv, progs in ((["pack", "list"], ["attune", "attune pack", "attune pack list"]),
                                (["-p", "x", "run", "core.echo"], ["attune", "attune run"]),
                                (["--wait-for-server", "3", "health"], ["attune", "attune health"])):
                del filled[:]
                args, _ = self.parse(argv)
                self.assertIsNotNone(args, argv)
                self.assertEqual(filled, progs)

    def test_abbreviations_and_errors_reach_the_right_parser(self):
        args, _ = self.parse(["--prof", "x", "pack", "list"])
        self.assertEqual((args.profile, args.command_path), ("x", ["pack", "list"]))
        args, _ = self.parse(["action", "--conf", "c.json", "list", "--pack", "core"])
        self.assertEqual((args.config, args.pack), ("c.json", "core"))
        for argv, message in ((["pack", "lst"], "unknown command 'lst'"), (["--prof", "x", "pack", "lst"], "lst"),
                              (["nope"], "unknown command 'nope'"), (["pack"], "pack needs a command: list, "),
                              (["execution", "show", "x"], "expected a whole number")):
            args, err = self.parse(argv)
            self.assertIsNone(args, argv)
            self.assertIn(message, err)

    def test_bare_attune_shows_the_overview(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = attune.main([], environ={"HOME": "/nonexistent"})
        self.assertEqual(code, 0)
        self.assertEqual(out.getvalue(), attune.top_help(attune.help_width()))

    def test_typos_get_the_closest_name_and_where_to_look(self):
        """An unknown command, subcommand, option or choice: one line naming it, the closest
        that exists at that place (from the declarations), and the command that lists them."""
        for argv, expected in (
                (["pakc"], "unknown command 'pakc' for attune; did you mean 'pack'? (see: attune --help)"),
                (["pack", "lst"], "unknown command 'lst' for attune pack; did you mean 'pack list'? "
                                  "(see: attune pack --help)"),
                (["-p", "prod", "execution", "shwo", "7"], "did you mean 'execution show'?"),
                (["queue", "items", "core.inbox", "shw", "1"], "did you mean 'queue items show'? "
                                                               "(see: attune queue items --help)"),
                (["auth", "token", "craete"], "did you mean 'auth token create'?"),
                (["pack", "list", "--bogus"], "unknown option '--bogus' for attune pack list (see: attune pack list --help)"),
                (["pack", "list", "--nme", "x"], "did you mean '--name'?"),
                (["execution", "list", "--stauts", "running"], "did you mean '--status'?"),
                (["--profle", "x", "pack", "list"], "unknown option '--profle' for attune; did you mean '--profile'?"),
                (["pack", "list", "-jq"], "unknown option '-jq' for attune pack list"),
                (["completion", "bsh"], "unknown choice 'bsh' for attune completion; did you mean 'bash'?"),
                (["xyzzy"], "unknown command 'xyzzy' for attune (see: attune --help)"),
                (["key", "get", "API_KEY"], "unknown command 'get' for attune key; did you mean 'key show'?"),
                (["pack", "remove", "core"], "did you mean 'pack uninstall'?"),
                (["execution", "ls"], "did you mean 'execution list'?"),
                (["execution", "stop", "7"], "did you mean 'execution cancel'?")):
            with self.subTest(argv=argv):
                args, err = self.parse(argv)
                self.assertIsNone(args)
                self.assertIn(expected, err)
                self.assertEqual(len(err.splitlines()), 1, err)

    def test_every_usage_error_is_one_line_of_one_shape(self):
        """A missing argument, a value that is not one of the choices or not of the type, and a
        group (or a command above others) named alone: for every command, one line 'attune:
        error: ... (see: attune PATH --help)', exit 2, never argparse's usage block."""
        def sample(spec):
            kind = spec.get("type")
            return str(spec["choices"][0]) if "choices" in spec else "1" if isinstance(kind, attune.Number) else "x"

        lines = []
        for name in attune.TOP_LEVEL:
            if name in attune.GROUP_HELP:
                lines.append(([name], "%s needs a command: " % name, [name]))
        for cmd in attune.COMMANDS:
            base, path = [], list(cmd.path)
            for depth in range(1, len(path) + 1):  # the words that reach the command (queue items REF show)
                above = attune.find_command(cmd.path[:depth])
                base += [path[depth - 1]] + [sample(s) for f, s in (above.arguments if above and depth < len(path)
                                                                     else ()) if not f[0].startswith("-")
                                             and s.get("nargs") is None]
            needed = [(f, s) for f, s in cmd.arguments if (not f[0].startswith("-") and s.get("nargs") in (None, "+"))
                      or s.get("required")]
            if needed:
                lines.append((base, " needs ", path))

            def given(bad_flags=None, bad=None):  # every needed argument given, one of them as bad
                words = list(base)
                for f, s in needed:
                    words += ([f[-1]] if f[0].startswith("-") else []) + [bad if f == bad_flags else sample(s)]
                return words

            for flags, spec in cmd.arguments:
                if "choices" not in spec and not isinstance(spec.get("type"), attune.Number):
                    continue
                bad = "no-such-choice" if "choices" in spec else "abc"
                if flags in [f for f, _ in needed]:  # a positional choice is a word with no place (usage_problem)
                    lines.append((given(flags, bad), " of attune " if flags[0].startswith("-") else "", path))
                elif flags[0].startswith("-"):
                    lines.append((given() + [flags[-1], bad], " of attune ", path))
        checked = 0
        for argv, expected, path in lines:
            with self.subTest(argv=argv):
                args, err = self.parse(argv)
                self.assertIsNone(args, argv)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertIn(expected, err)
                self.assertRegex(err, r"\(see: attune( [a-z-]+)* --help\)$")
                self.assertNotIn("usage:", err)
                checked += 1
        self.assertGreater(checked, 150)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = attune.main(["execution", "show"], environ={"HOME": "/nonexistent"})
        self.assertEqual((code, out.getvalue(), err.getvalue()),
                         (2, "", "attune: error: attune execution show needs ID (see: attune execution show --help)\n"))

    def test_the_verbs_of_other_clis_lead_to_the_command(self):
        """Each command named show, list, cancel, logs, create, update, delete or uninstall is
        where the verb gh, kubectl, aws or docker would use for it leads (unless that verb is a
        command of the same place itself): `key get` to `key show`, `pack remove` to `pack
        uninstall`, `execution stop` to `execution cancel`."""
        others = {"show": ("get", "describe", "view"), "list": ("ls",), "cancel": ("stop", "kill"),
                  "logs": ("log", "tail"), "create": ("new", "add"), "update": ("edit", "modify"),
                  "delete": ("rm", "remove", "del"), "uninstall": ("remove", "rm")}
        checked = 0
        for cmd in attune.COMMANDS:
            *place, verb = cmd.path
            siblings = {c.path[-1] for c in attune.COMMANDS if list(c.path[:-1]) == place}
            for other in others.get(verb, ()):
                if other in siblings or (verb == "uninstall" and "delete" in siblings):
                    continue
                base = []  # the words that reach the place (queue items REF)
                for depth in range(1, len(place) + 1):
                    above = attune.find_command(cmd.path[:depth])
                    base += [cmd.path[depth - 1]] + ["x" for f, s in (above.arguments if above else ())
                                                     if not f[0].startswith("-") and s.get("nargs") is None]
                with self.subTest(place=place, typed=other):
                    problem = attune.usage_problem(base + [other, "1"])
                    self.assertIn("did you mean '%s'?" % " ".join(cmd.path), problem)
                    checked += 1
        self.assertGreater(checked, 60)

    def test_a_harmless_typo_never_suggests_a_destructive_command(self):
        """Every one-letter slip (a letter left out, doubled, swapped with the next or replaced)
        of every command that deletes nothing: the suggestion, if any, is never delete,
        remove, uninstall, revoke, cancel, abort or logout; the slips of those commands
        themselves still find them."""
        letters = "abcdeilmnorstuvy-"
        def slips(word):
            out = {word[:i] + word[i + 1:] for i in range(len(word))}
            out |= {word[:i] + word[i] + word[i:] for i in range(len(word))}
            out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)}
            out |= {word[:i] + c + word[i + 1:] for i in range(len(word)) for c in letters}
            return sorted(out - {word, ""})

        checked = found = 0
        for cmd in attune.COMMANDS:
            *place, verb = cmd.path
            names = {" ".join(c.path): c.path[-1] for c in attune.COMMANDS if list(c.path[:-1]) == place}
            for typo in sampled(slips(verb)):
                if typo in names.values():
                    continue
                hint = attune.suggestion(typo, list(names))
                if verb in attune.DESTRUCTIVE:
                    found += hint == " ".join(cmd.path)
                elif hint is not None:
                    self.assertNotIn(names[hint], attune.DESTRUCTIVE, "%r (a slip of %r) led to %r" % (typo, verb, hint))
                checked += 1
        self.assertGreater(checked, 500)
        self.assertGreater(found, 10)
        for word, places in (("delte", ("key show", "key delete")), ("revok", ("auth token list", "auth token revoke")),
                             ("cancle", ("execution show", "execution cancel"))):
            self.assertEqual(attune.suggestion(word, list(places)), places[1])

    def test_every_line_argparse_takes_passes_the_check(self):
        """Each command with each of its options, spelled in full, abbreviated and attached,
        global options before and after, -- and values that start with a dash: none of it is
        called unknown by usage_problem."""
        def sample(flags, spec):
            if "choices" in spec:
                return str(spec["choices"][0])
            kind = spec.get("type")
            return "1" if isinstance(kind, attune.Number) else "true" if spec.get("nargs") == "?" else "x"

        checked = 0
        for cmd in attune.COMMANDS:
            base = []  # each word of the path, then the positionals of the command it names (queue items REF)
            for depth in range(1, len(cmd.path) + 1):
                above = attune.find_command(cmd.path[:depth])
                base += [cmd.path[depth - 1]] + [sample(f, s) for f, s in (above.arguments if above else ())
                                                 if not f[0].startswith("-")
                                                 and s.get("nargs") not in ("?", "*", attune.REMAINDER)]
            lines = [base, ["-p", "x", "--api-url", "http://h"] + base + ["-j", "-v"], ["-jv"] + base]
            known = [f for fl, _ in cmd.arguments + attune.GLOBAL_OPTIONS if fl[0].startswith("-") for f in fl]
            for flags, spec in cmd.arguments:
                if not flags[0].startswith("-"):
                    continue
                flag = ([f for f in flags if f.startswith("--")] or list(flags))[0]
                value = [] if spec.get("action") in attune.FLAG_ACTIONS else [sample(flags, spec)]
                lines.append(base + [flag] + value)
                if value:
                    lines.append(base + ["%s=%s" % (flag, value[0])])
                if flag.startswith("--") and sum(1 for f in known if f.startswith(flag[:-1])) == 1:
                    lines.append(base + [flag[:-1]] + value)  # a prefix argparse takes
            for argv in lines:
                self.assertIsNone(attune.usage_problem(argv), argv)
                checked += 1
        for argv in (["auth", "exec", "--", "env", "-i", "--bogus"], ["auth", "exec", "env", "-i", "--bogus"],
                     ["run", "core.echo", "--param", "n=-1"], ["api", "GET", "/x", "--data", "-"],
                     ["--output=json", "pack", "list"], ["-pprod", "pack", "list"]):
            self.assertIsNone(attune.usage_problem(argv), argv)
        self.assertGreater(checked, 1000)

    def test_every_declaration_builds(self):
        for cmd in attune.COMMANDS:
            with self.subTest(cmd.path):
                args, err = self.parse(list(cmd.path) + ["--help"])
                self.assertIsNone(args)
        self.assertEqual(attune.TOP_LEVEL[:3], ["auth", "config", "pack"])
        self.assertEqual(len(set(c.path for c in attune.COMMANDS)), len(attune.COMMANDS))


class RunnerTests(unittest.TestCase):
    """The runner that test-all and CI rely on: a hung test is named, and the RESULT line
    that test-all counts still comes."""

    def planted_hang(self):  # not collected (no test_ prefix): run by name below
        threading.Event().wait()

    def test_a_hung_test_is_named_and_the_result_line_still_comes(self):
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "run-suite",
                              "RunnerTests.planted_hang"], cwd=HERE, env=dict(os.environ, ATTUNE_TEST_LIMIT="1"),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
        out = p.communicate(timeout=120)[0]
        self.assertEqual(p.returncode, 1, out)
        self.assertIn("RunnerTests.planted_hang ran past 1 s; the suite stops here", out)
        self.assertIn("in planted_hang", out)  # every thread's stack, the hung one's included
        self.assertEqual(out.splitlines()[-1], "RESULT passed=0 failed=1 skipped=0")

    def test_quick_leaves_out_what_is_marked_slow(self):
        names = {test.id().rsplit(".", 1)[1] for test in iter_tests(
            unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__]))
            if getattr(getattr(test, test._testMethodName), "slow", False) or getattr(type(test), "slow", False)}
        self.assertIn("test_200_writers_killed_at_random_moments", names)
        self.assertNotIn("test_a_hung_test_is_named_and_the_result_line_still_comes", names)


# === Sandbox, demo, test-all =================================================

def serve(argv):
    """The embedded sandbox: a FakeAttune in the foreground until interrupted."""
    import argparse
    parser = argparse.ArgumentParser(prog="test_attune.py serve", description="Run the Attune sandbox.")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--access-ttl", type=int, default=3600, help="access token lifetime, seconds")
    parser.add_argument("--refresh-ttl", type=int, default=7 * 86400, help="refresh token lifetime")
    parser.add_argument("--refresh-mode", choices=("reusable", "single-use"), default="reusable")
    args = parser.parse_args(argv)
    try:
        fake = FakeAttune(access_ttl=args.access_ttl, refresh_ttl=args.refresh_ttl,
                          refresh_mode=args.refresh_mode, admin_password="admin").start(args.port)
    except OSError as e:  # the port taken, or one below 1024 without the right: a line, not a traceback
        taken = e.errno == errno.EADDRINUSE
        print("test_attune.py serve: cannot listen on 127.0.0.1:%d: %s; %s" % (
            args.port, e.strerror or e, "another program uses it (the sandbox already running?): choose another "
            "with --port N, or --port 0 for any free one" if taken else "choose another with --port N"),
            file=sys.stderr)
        return 1
    print("Attune sandbox listening on %s (user admin, password admin); Ctrl-C stops it" % fake.url, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


def demo():
    """Start the sandbox, walk through login, whoami, expiry, automatic refresh and logout, stop."""
    import shlex
    access_ttl = 35  # the refresh margin is half of that, 17 s, so a refresh is due after ~18 s
    fake = FakeAttune(access_ttl=access_ttl, admin_password="admin").start()
    tmp = tempfile.mkdtemp(prefix="attune-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")}
    env.update(ATTUNE_CONFIG=os.path.join(tmp, "credentials.json"), PYTHONIOENCODING="utf-8")
    steps = [
        ("Log in; the password comes from stdin, as in a script",
         ["auth", "login", "-u", "admin", "--password-stdin", "--url", fake.url], "admin\n", 0),
        ("Who am I?", ["auth", "whoami"], None, 0),
        ("The sandbox issues %d-second access tokens" % access_ttl, ["auth", "status"], None, 0),
        ("The credential file (mode 0600) and its profiles", ["config", "profiles"], None, 0),
        ("Run an action and wait for it", ["run", "core.echo", "--param", "message=Hello from attune.py",
                                           "--watch"], None, 0),
        (None, 19, None, None),
        ("The token is now inside its refresh margin: -v shows the automatic refresh",
         ["-v", "pack", "list"], None, 0),
        ("A fresh access token again", ["auth", "status", "--offline"], None, 0),
        ("Log out: the stored tokens are forgotten (the server keeps no session)",
         ["auth", "logout"], None, 0),
        ("Now whoami needs a login, and says so with exit code 4", ["auth", "whoami"], None, 4),
        ("Log in by SSO with the device flow (the sandbox approves after two polls)",
         ["auth", "sso-login", "--no-browser"], None, 0),
        ("Who am I now?", ["auth", "whoami"], None, 0),
    ]
    failures = 0
    try:
        print("Attune sandbox running at %s (user admin, password admin)" % fake.url)
        print("Credential file: %s" % env["ATTUNE_CONFIG"])
        for title, argv, stdin, expected in steps:
            if title is None:
                print("\n# waiting %d s for the access token to near its expiry ..." % argv, flush=True)
                time.sleep(argv)
                continue
            print("\n# %s\n$ %sattune %s" % (title, "echo admin | " if stdin else "",
                                            " ".join(shlex.quote(a) for a in argv)), flush=True)
            p = subprocess.Popen([sys.executable, ATTUNE_PY] + argv, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
            out = p.communicate(stdin or "")[0]
            sys.stdout.write(out)
            if p.returncode:
                print("(exit code %d)" % p.returncode)
            failures += p.returncode != expected
        print("\nThe sandbox saw %d requests: %s" % (fake.count(), ", ".join(fake.log())))
    finally:
        fake.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("demo %s" % ("finished" if not failures else "FAILED (%d unexpected exit codes)" % failures))
    return 1 if failures else 0


ONE_LINER = ("import sys, urllib.request\n"
             "request = urllib.request.Request(sys.argv[1] + '/api/v1/packs', "
             "headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
             "sys.stdout.write(urllib.request.urlopen(request).read().decode())\n")


# Runs a script (or nothing) and reports the process's own peak RSS (VmHWM) at exit.
# rusage would not do: its ru_maxrss keeps the high-water mark of the parent's memory
# that a forked child holds until it execs, which here is the whole benchmark.
# attune's exit_process skips atexit, so os._exit reports too.
PEAK_WRAPPER = ("import atexit, os, sys\n"
                "def report():\n"
                "    with open('/proc/self/status') as f:\n"
                "        sys.stderr.write(''.join(l for l in f if l.startswith('VmHWM:')))\n"
                "    sys.stderr.flush()\n"
                "atexit.register(report)\n"
                "leave = os._exit\n"
                "def report_and_leave(code):\n"
                "    atexit.unregister(report)\n"
                "    report()\n"
                "    leave(code)\n"
                "os._exit = report_and_leave\n"
                "sys.argv = sys.argv[1:]\n"
                "if sys.argv:\n"
                "    path = sys.argv[0]\n"
                "    code = compile(open(path).read(), path, 'exec')\n"
                "    exec(code, {'__name__': '__main__', '__file__': path, '__builtins__': __builtins__})\n")


def run_timed(argv, env):
    """Seconds one process takes."""
    started = time.perf_counter()
    status = subprocess.call(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if status:
        raise SystemExit("bench: %s failed (status %d)" % (" ".join(argv[1:3]), status))
    return time.perf_counter() - started


def peak_kb(interpreter, script_argv, env):
    """Peak RSS in KB of interpreter (a list: the python and its flags) running script_argv
    (a script and its arguments; empty: nothing, as python -c pass)."""
    p = subprocess.Popen(interpreter + ["-c", PEAK_WRAPPER] + script_argv, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, universal_newlines=True)
    err = p.communicate()[1]
    return int(re.search(r"VmHWM:\s+(\d+)", err).group(1))


def side_by_side(measure, first, second, runs):
    """Medians of measure(first) and measure(second), taken alternately."""
    import statistics
    samples = ([], [])
    for _ in range(runs):
        samples[0].append(measure(first))
        samples[1].append(measure(second))
    return statistics.median(samples[0]), statistics.median(samples[1])


def bench_profile(server, config, left, revoke=False):
    """Store a session whose access token has `left` seconds left; its access token."""
    now = int(time.time())
    profile = {"api_url": server.url, "auth_token": server.mint("admin", ttl=3600, iat=now + left - 3600),
               "refresh_token": server.mint("admin", "refresh"), "auth_token_expires_at": now + left,
               "refresh_token_expires_at": now + 86400, "username": "admin", "invalidated_at": None}
    if revoke:
        server.revoked.add(profile["auth_token"])
    os.makedirs(os.path.dirname(config), mode=0o700, exist_ok=True)
    with open(config, "w") as f:
        json.dump({"version": 1, "current_profile": "default", "profiles": {"default": profile}}, f)
    os.chmod(config, 0o600)
    return profile["auth_token"]


def bench_batch(python, server, env, expired):
    """Wall time of 32 `auth whoami` processes started together, the refreshes they
    caused, and how many failed."""
    bench_profile(server, env["ATTUNE_CONFIG"], -100 if expired else 3000)
    before = server.count("POST", "/auth/refresh")
    started = time.perf_counter()
    procs = [subprocess.Popen([python, ATTUNE_PY, "auth", "whoami"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(32)]
    failed = sum(1 for p in procs if p.wait())
    elapsed = time.perf_counter() - started
    return elapsed, server.count("POST", "/auth/refresh") - before, failed


def bench_list_server(count):
    """A fake holding count packs whose list pages are slices of one sorted list (the fake's
    own listing sorts its dict on every page, which would be the figure's whole cost)."""
    server = FakeAttune()
    server.packs = {"bench.p%06d" % i: server.new_pack(10 + i, "bench.p%06d" % i, "Bench pack %d" % i,
                                                       "a pack among %d for the memory figure" % count)
                    for i in range(count)}
    ordered = sorted(server.packs.values(), key=lambda pack: pack["id"])
    server.packs_list = lambda req: server.paginate(req, ordered)
    return server.start()


def bench(argv):
    """make bench: each figure a ratio of medians, measured side by side in one run."""
    import argparse
    import platform
    import statistics
    parser = argparse.ArgumentParser(prog="test_attune.py bench")
    parser.add_argument("--runs", type=int, default=31, help="runs of each command (at least 20)")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs: a median needs at least 20 runs")
    tmp = tempfile.mkdtemp(prefix="attune-bench-")
    home = os.path.join(tmp, "home")
    os.makedirs(home)
    server = FakeAttune(refresh_mode="single-use").start()
    config = os.path.join(home, ".config", "attune", "credentials.json")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8",
           "ATTUNE_CONFIG": config}
    pythons = [("Debian python3", "/usr/bin/python3")] if os.path.exists("/usr/bin/python3") else []
    if not pythons or os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3"):
        pythons.append(("python %d.%d (%s)" % (sys.version_info[:2] + (sys.executable,)), sys.executable))
    failures = 0
    try:
        print("machine: %s, %d cores, %s; %d runs of each, alternating" % (
            platform.platform(), os.cpu_count() or 0, platform.processor() or platform.machine(), args.runs))
        for n, (label, python) in enumerate(pythons):
            token = bench_profile(server, config, 3000)
            fleet = os.path.join(home, "fleet.json")  # the same session among 10,000 profiles
            with open(config) as f:
                doc = json.load(f)
            doc["profiles"].update(many_profiles(10000))
            with open(fleet, "w") as f:
                json.dump(doc, f, indent=2)
            os.chmod(fleet, 0o600)
            prefix = os.path.join(tmp, "prefix-%d" % n)
            run_timed([python, ATTUNE_PY, "self-install", "--prefix", prefix], env)
            installed = [os.path.join(prefix, "bin", "attune")]
            copied = [python, ATTUNE_PY]
            complete_command, complete_action = ["__complete", "--", "pack", "l"], ["__complete", "--", "run", "core."]
            for warm in (["auth", "token"], ["--help"], ["--version"], ["--json", "pack", "list"], complete_command,
                         complete_action):
                run_timed(installed + warm, env)
            bare = [python, "-c", "pass"]
            beside = os.path.join(tmp, "script-%d" % n)  # a script with attune.py copied beside it
            os.makedirs(beside)
            shutil.copy(ATTUNE_PY, beside)
            with open(os.path.join(beside, "deploy.py"), "w") as f:
                f.write("import attune\n")
            import_copied = [python, os.path.join(beside, "deploy.py")]
            import_installed = [python, "-c", "import sys; sys.path.insert(0, %r); import attune"
                                % os.path.join(prefix, "lib", "attune")]
            run_timed(import_copied, env)  # its bytecode cache, as a second run has it
            compile_only = [python, "-c", "compile(open(%r).read(), 'attune.py', 'exec')" % ATTUNE_PY]
            pairs = [("installed auth token vs python -c pass", installed + ["auth", "token"], bare, 1.0),
                     ("installed --help vs python -c pass", installed + ["--help"], bare, 1.5),
                     ("installed --version vs python -c pass", installed + ["--version"], bare, 1.5),
                     ("python attune.py auth token vs its compile", copied + ["auth", "token"], compile_only, 1.2),
                     # a copied file is compiled on every run: the price of one file, kept within bounds
                     ("python attune.py auth token vs python -c pass", copied + ["auth", "token"], bare, 10.0),
                     ("installed --json pack list vs a bare urllib GET", installed + ["--json", "pack", "list"],
                      [python, "-c", ONE_LINER, server.url, token], 1.1),
                     ("installed __complete pack l vs python -c pass", installed + complete_command, bare, 1.0),
                     ("installed __complete run core. vs urllib GET", installed + complete_action,
                      [python, "-c", ONE_LINER, server.url, token], 1.1),
                     # a 10,000-profile file (2.7 MB) through the C parser: json's import and parse
                     # cost about 20 ms, twice the installed command itself; a copied file pays
                     # its compile on top, so there the file is a small part
                     ("python attune.py auth token, 10,000 profiles vs 1", copied + ["--config", fleet, "auth",
                                                                                   "token"],
                      copied + ["--config", config, "auth", "token"], 1.5),
                     ("installed auth token, 10,000 profiles vs 1", installed + ["--config", fleet, "auth", "token"],
                      installed + ["--config", config, "auth", "token"], 3.5),
                     ("import attune, installed, vs python -c pass", import_installed, bare, 1.3),
                     ("import attune, copied beside a script, vs -c pass", import_copied, bare, 1.8)]
            gh = shutil.which("gh")
            if gh:
                pairs.insert(1, ("installed auth token vs gh auth token", installed + ["auth", "token"],
                                 [gh, "auth", "token"], 0.3))
            else:
                print("  (gh is not installed: apt-get install gh to compare with it)")
            print("\n%s: %s" % (label, python))
            figures = []
            bench_env = dict(env, GH_TOKEN="gho_" + "x" * 36)
            for name, first, second, target in pairs:
                a, b = side_by_side(lambda argv: run_timed(argv, bench_env), first, second, args.runs)
                figures.append((name, a * 1000, b * 1000, "ms", target))
            if os.path.exists("/proc/self/status"):
                a, b = side_by_side(lambda case: peak_kb(case[0], case[1], env),
                                    ([python, "-IS"], installed + ["auth", "token"]), ([python], []), args.runs)
                figures.append(("peak memory of installed auth token vs python", a / 1024.0, b / 1024.0, "MB", 1.2))
                # --all prints each page as it comes: 100,000 packs (about 30 MB of JSON) cost the
                # memory of one page, not of the list
                big, small = bench_list_server(100000), bench_list_server(100)
                try:
                    list_env = [dict(env, ATTUNE_API_URL=s.url, ATTUNE_API_TOKEN=s.mint("admin", ttl=3600))
                                for s in (big, small)]
                    a, b = side_by_side(lambda e: peak_kb([python, "-IS"], installed + ["-j", "pack", "list", "--all"],
                                                          e), list_env[0], list_env[1], min(args.runs, 5))
                finally:
                    big.stop()
                    small.stop()
                figures.append(("peak memory, -j pack list --all: 100,000 vs 100", a / 1024.0, b / 1024.0, "MB",
                                1.5))
            else:
                print("  (peak memory is measured on Linux only)")
            for figure, a, b, unit, limit in figures:
                ratio = a / b
                ok = ratio <= limit
                failures += not ok
                print("  %-48s %7.1f %s / %7.1f %s = %.2fx  (target <= %.1fx) %s"
                      % (figure, a, unit, b, unit, ratio, limit, "ok" if ok else "MISSED"))
        python = pythons[0][1]
        fresh, expired = [], []
        for _ in range(args.runs):
            fresh.append(bench_batch(python, server, env, expired=False))
            expired.append(bench_batch(python, server, env, expired=True))
        failed = sum(r[2] for r in fresh + expired)
        ratio = statistics.median(r[0] for r in expired) / statistics.median(r[0] for r in fresh)
        once = all(r[1] == 1 for r in expired) and all(r[1] == 0 for r in fresh)
        ok = ratio <= 1.3 and once and not failed
        failures += not ok
        print("\n32 processes at once (%s):" % pythons[0][0])
        print("  expired token vs fresh token, wall time            %.0f ms / %.0f ms = %.2fx  (target <= 1.3x) %s"
              % (statistics.median(r[0] for r in expired) * 1000, statistics.median(r[0] for r in fresh) * 1000,
                 ratio, "ok" if ok else "MISSED"))
        print("  refreshes per batch with an expired token: %s; failed commands: %d"
              % (sorted(set(r[1] for r in expired)), failed))
        counts = []
        for left, revoke in ((3000, False), (-100, False), (3000, True)):
            bench_profile(server, config, left, revoke)
            before = server.count()
            run_timed([python, ATTUNE_PY, "auth", "whoami"], env)
            counts.append(server.count() - before)
        ok = counts == [1, 2, 3]
        failures += not ok
        print("  requests for a valid, a known-expired and a revoked token: %s  (target [1, 2, 3]) %s"
              % (counts, "ok" if ok else "MISSED"))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n%d of the figures missed their target" % failures if failures else "\nall figures within target")
    return 1 if failures else 0


def find_interpreters():
    """[(label, path)]: each CPython 3.6-3.13 that pyenv has (newest patch), then pypy3."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    try:
        root = subprocess.check_output(["pyenv", "root"], universal_newlines=True,
                                       stderr=subprocess.DEVNULL).strip() or root
    except (OSError, subprocess.CalledProcessError):
        pass
    best = {}
    versions = os.path.join(root, "versions")
    for name in (os.listdir(versions) if os.path.isdir(versions) else []):
        match = re.match(r"^3\.(\d+)\.(\d+)$", name)
        path = os.path.join(versions, name, "bin", "python3")
        if match and 6 <= int(match.group(1)) <= 13 and os.access(path, os.X_OK):
            minor, patch = int(match.group(1)), int(match.group(2))
            if patch >= best.get(minor, (-1, None))[0]:
                best[minor] = (patch, path)
    found = [("CPython 3.%d" % minor, best[minor][1]) for minor in sorted(best)]
    pypy = shutil.which("pypy3")
    if pypy:
        found.append(("PyPy 3", pypy))
    return found or [("python3", sys.executable)]


class ProgressResult(unittest.TextTestResult):
    """A line per test class as it finishes (counts and seconds), and a watchdog: a test that
    runs past TEST_LIMIT is named, every thread's stack is printed, and the suite ends there
    with its RESULT line, so that the run's closing line still comes."""

    def __init__(self, stream, descriptions, verbosity):
        super().__init__(stream, descriptions, 0)
        self.group = None  # [class name, started, tests, bad, skipped] of the class running
        self.current = None  # (test id, monotonic start) of the test running
        watchdog = threading.Thread(target=self.watch, daemon=True)
        watchdog.start()

    def counts(self):
        return failed_tests(self), len(self.skipped)

    def startTest(self, test):
        name = type(test).__name__
        if self.group is None or self.group[0] != name:
            self.end_group()
            self.group = [name, time.monotonic(), self.testsRun] + list(self.counts())
        self.current = (test.id(), time.monotonic())
        super().startTest(test)

    def stopTest(self, test):
        self.current = None
        super().stopTest(test)

    def end_group(self):
        if self.group:
            name, started, run, bad, skipped = self.group
            now_bad, now_skipped = self.counts()
            ran, bad, skipped = self.testsRun - run, now_bad - bad, now_skipped - skipped
            print("  %-32s %3d passed, %d failed, %d skipped  %6.1f s"
                  % (name, ran - bad - skipped, bad, skipped, time.monotonic() - started), flush=True)
            self.group = None

    def stopTestRun(self):
        self.end_group()
        super().stopTestRun()

    def watch(self):
        tick = threading.Event()  # not time.sleep: tests replace that, and would see these calls
        while True:
            tick.wait(1)
            current = self.current
            if current and time.monotonic() - current[1] > TEST_LIMIT:
                import faulthandler
                sys.stdout = sys.__stdout__  # not a test's captured output
                print("\nHUNG: %s ran past %d s; the suite stops here" % (current[0], TEST_LIMIT), flush=True)
                faulthandler.dump_traceback(sys.stdout, all_threads=True)
                bad, skipped = self.counts()
                print_result(self.testsRun - 1 - bad - skipped, bad + 1, skipped)
                os._exit(1)


TEST_LIMIT = float(os.environ.get("ATTUNE_TEST_LIMIT") or 600)  # seconds one test may run (the longest:
# under 3 minutes on a loaded machine)


def failed_tests(result):
    """How many tests failed: a test whose subtests failed counts once."""
    cases = {getattr(test, "test_case", test).id() for test, _ in result.failures + result.errors}
    return len(cases) + len(result.unexpectedSuccesses)


def print_result(passed, failed, skipped):
    print("RESULT passed=%d failed=%d skipped=%d" % (passed, failed, skipped), flush=True)


def run_suite(names=(), quick=False):
    """Run this file's tests (or the named ones), a line per class; `quick` leaves out the
    @slow ones. The last line is machine-readable for test-all."""
    loader, module = unittest.defaultTestLoader, sys.modules[__name__]
    suite = unittest.TestSuite()
    for test in iter_tests(loader.loadTestsFromNames(names, module) if names else loader.loadTestsFromModule(module)):
        if not (quick and (getattr(type(test), "slow", False) or
                           getattr(getattr(test, test._testMethodName, None), "slow", False))):
            suite.addTest(test)
    print("%s: %d tests (%s)" % (sys.executable, suite.countTestCases(), "quick part" if quick else "all"),
          flush=True)
    started = time.monotonic()
    result = unittest.TextTestRunner(stream=sys.stdout, resultclass=ProgressResult, verbosity=0).run(suite)
    bad, skipped = failed_tests(result), len(result.skipped)
    print("%d passed, %d failed, %d skipped in %.0f s" % (result.testsRun - bad - skipped, bad, skipped,
                                                           time.monotonic() - started))
    print_result(result.testsRun - bad - skipped, bad, skipped)
    return 1 if bad else 0


def iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            for test in iter_tests(item):
                yield test
        else:
            yield item


SUITE_LIMIT = 2400  # seconds for one interpreter's suite under test-all (the slowest takes ~10 min)
RUN_LIMIT = 4200  # seconds for the whole of test-all: its closing line comes inside CI's 90 minutes


def coverage_rc(workdir):
    """A coverage rc file in workdir: attune.py measured in the suite's own process and in every
    Python child it starts (coverage's subprocess patch; the _exit patch saves a child's data
    before attune.py's os._exit)."""
    rc = os.path.join(workdir, "coveragerc")
    with open(rc, "w") as f:
        f.write("[run]\nparallel = True\ndata_file = %s\ninclude = %s\npatch =\n    subprocess\n    _exit\n"
                % (os.path.join(workdir, ".coverage"), ATTUNE_PY))
    return rc


def run_on(python, deadline, sample="0/1", long=True, coverage=None):
    """One interpreter's run of the suite: (passed, failed, skipped, seconds, output).
    sample: which part of each hostile table (see sampled()); long: the minutes-long test too;
    coverage: the rc file to run it under (with the dev tools on PYTHONPATH, for this one only)."""
    started = time.monotonic()
    env = dict(os.environ, ATTUNE_TEST_SAMPLE=sample, ATTUNE_TEST_LONG="1" if long else "0")
    argv = [python, os.path.abspath(__file__), "run-suite"]
    if coverage:
        argv[1:1] = ["-m", "coverage", "run", "--rcfile", coverage]
    else:
        env.pop("PYTHONPATH", None)  # the dev tools are built for the interpreter that measures
    limit = max(1, min(SUITE_LIMIT, deadline - started))
    try:
        p = subprocess.Popen(argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True)
    except OSError as e:
        return [0, 1, 0, time.monotonic() - started, "could not run %s: %s" % (python, e)]
    try:
        out = p.communicate(timeout=limit)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0]
        out += "\n%s did not finish the suite in %d s; stopped after the classes above\n" % (python, limit)
    match = re.search(r"^RESULT passed=(\d+) failed=(\d+) skipped=(\d+)$", out, re.M)
    counts = [int(n) for n in match.groups()] if match else [0, 1, 0]
    return counts + [time.monotonic() - started, out]


def report_coverage(python, rc, minimum):
    """Combine the data of the suite and its children; print the summary; False below minimum."""
    run = lambda *argv: subprocess.run([python, "-m", "coverage"] + list(argv) + ["--rcfile", rc],  # noqa: E731
                                       cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       universal_newlines=True)
    combined = run("combine", "-q")
    report = run("report", "--show-missing", "--fail-under=%d" % minimum)
    lines = report.stdout.splitlines()
    print("coverage of attune.py (this process and its children):", flush=True)
    print("\n".join(lines[-3:] or combined.stdout.splitlines()[-3:]), flush=True)
    if report.returncode:
        print("coverage is below %d%% (or could not be measured)" % minimum, flush=True)
    return report.returncode == 0


def coverage(minimum):
    """`make coverage`: the whole suite on this interpreter, measured with its children."""
    workdir = tempfile.mkdtemp(prefix="attune-coverage-")
    try:
        passed, failed, skipped, seconds, out = run_on(sys.executable, time.monotonic() + RUN_LIMIT,
                                                       long=False, coverage=coverage_rc(workdir))
        print(out, end="", flush=True)
        return 0 if report_coverage(sys.executable, os.path.join(workdir, "coveragerc"), minimum) and \
            not failed else 1
    finally:
        shutil.rmtree(workdir, True)


def test_all(argv):
    """The suite on every interpreter, ATTUNE_TEST_JOBS (default 3) at a time: the tests
    mostly wait on processes and sockets, so two cores run three suites at once. The first
    interpreter (which runs the minutes-long test) and PyPy (the slowest) start first.
    With --coverage MIN, this interpreter's run is measured (children included) and must
    reach MIN percent. One line per interpreter as it finishes, then 'N passed, N failed'."""
    minimum = int(argv[argv.index("--coverage") + 1]) if "--coverage" in argv else None
    deadline = time.monotonic() + RUN_LIMIT
    found = list(enumerate(find_interpreters()))
    found.sort(key=lambda entry: (entry[0] != 0, not entry[1][0].startswith("PyPy"), entry[0]))
    jobs = max(1, int(os.environ.get("ATTUNE_TEST_JOBS") or 3))
    results, lock = [], threading.Lock()
    workdir = tempfile.mkdtemp(prefix="attune-coverage-")
    rc = coverage_rc(workdir) if minimum is not None else None
    measured = []
    if rc:  # this interpreter (the dev tools' venv, whose .pth measures children) stands in for its base
        same = [i for i, (_, (_, python)) in enumerate(found)
                if os.path.realpath(python) == os.path.realpath(sys.executable)]
        index, label = (found[same[0]][0], found.pop(same[0])[1][0]) if same else (len(found), "this python")
        found.insert(0, (index, (label, sys.executable)))
        measured = [sys.executable]

    def worker():
        while True:
            with lock:
                if not found:
                    return
                index, (label, python) = found.pop(0)
            if time.monotonic() >= deadline:
                passed, failed, skipped, seconds, out = 0, 1, 0, 0, "not started: test-all ran out of time"
            else:
                passed, failed, skipped, seconds, out = run_on(
                    python, deadline, "%d/3" % (index % 3), index == 0, rc if python in measured else None)
            with lock:
                results.append((passed, failed))
                print("%-12s %4d passed, %d failed, %d skipped  (%.0f s, %s%s)"
                      % (label, passed, failed, skipped, seconds, python,
                         ", with coverage" if python in measured else ""), flush=True)
                if failed:
                    print(out[-6000:], flush=True)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    passed, failed = sum(r[0] for r in results), sum(r[1] for r in results)
    if rc and not report_coverage(sys.executable, rc, minimum):
        failed += 1
    shutil.rmtree(workdir, True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "serve":
        sys.exit(serve(sys.argv[2:]))
    elif command == "demo":
        sys.exit(demo())
    elif command == "test-all":
        sys.exit(test_all(sys.argv[2:]))
    elif command == "run-suite":
        sys.exit(run_suite(sys.argv[2:]))
    elif command == "check":
        os.environ.setdefault("ATTUNE_TEST_SAMPLE", "0/3")  # a third of each hostile table
        sys.exit(run_suite(quick=True))
    elif command == "coverage":
        sys.exit(coverage(int(sys.argv[2])))
    elif command == "bench":
        sys.exit(bench(sys.argv[2:]))
    elif command == "interpreters":
        print("\n".join(path for _, path in find_interpreters()))
    else:
        unittest.main()
